"""README is an index: short, every link it makes leads to a file, and every page of docs/
is reachable from it; the paths the docs name exist."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_readme_is_short_and_links_every_docs_page_that_exists():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 220
    links = set(re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text))
    local = {link for link in links if not link.startswith(("http://", "https://"))}
    assert all((ROOT / link).exists() for link in local), sorted(l for l in local if not (ROOT / l).exists())
    pages = {f"docs/{p.name}" for p in (ROOT / "docs").glob("*.md")}
    assert pages <= local, f"docs pages README does not link: {sorted(pages - local)}"


def test_the_test_files_the_docs_name_exist():
    named = set()
    for page in [ROOT / "README.md", *(ROOT / "docs").glob("*.md")]:
        named |= set(re.findall(r"tests/[\w/]+\.py", page.read_text()))
    missing = sorted(p for p in named if not (ROOT / p).exists())
    assert not missing, missing
