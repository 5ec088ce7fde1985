"""The ADK dev UI in a real browser (headless Chromium): pick the assistant agent, send a
message, see the local model's reply streamed onto the page. Saves a screenshot."""
import json
import shutil
from pathlib import Path

import pytest

from adk_backend.server import create_app
from server_helpers import LiveServer

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no Chromium installed (Debian package 'chromium')")
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]


def test_dev_ui_streams_the_local_models_reply():
    from playwright.sync_api import sync_playwright

    with LiveServer(create_app(agents_dir="agents", model="smollm2-135m-instruct")) as server, \
            sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        page = browser.new_page(viewport={"width": 1280, "height": 720})
        page.goto(server.url + "/dev-ui/?app=assistant")
        page.get_by_placeholder("Type a message...").wait_for(timeout=30000)
        try:  # ADK's one-time usage-data dialog
            page.get_by_text("No Thanks").click(timeout=3000)
        except Exception:
            pass
        for menu in ("More options", "User menu"):  # turn on token streaming (SSE) in the UI
            if page.get_by_text("Streaming").count():
                break
            page.get_by_label(menu).click()
        toggle = page.get_by_text("Streaming")
        if toggle.count():
            toggle.first.click()
            page.keyboard.press("Escape")
        box = page.get_by_placeholder("Type a message...")
        box.fill("What is the capital of France?")
        with page.expect_response(lambda r: "/run_sse" in r.url, timeout=60000) as response:
            box.press("Enter")
        request_body = json.loads(response.value.request.post_data)
        events = [json.loads(line[5:]) for line in response.value.text().splitlines() if line.startswith("data:")]
        final = [e for e in events if not e.get("partial") and e.get("content")][-1]
        reply = "".join(p.get("text", "") for p in final["content"]["parts"])
        assert reply.strip()
        bubble = page.locator(".message-row-container.bot .message-content").last
        bubble.wait_for(timeout=30000)
        page.wait_for_function("t => document.body.innerText.includes(t)", arg=reply.strip()[:40], timeout=30000)
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "dev-ui.png"))
        browser.close()
    assert request_body["appName"] == "assistant" and request_body["streaming"] is True
    partial = [e for e in events if e.get("partial")]
    assert len(partial) >= 2, "the reply did not arrive as a stream"
    assert "".join(p["content"]["parts"][0]["text"] for p in partial) == reply
