from __future__ import annotations

from pathlib import Path

from fastapi_resilience import ResilienceSettings

ROOT = Path(__file__).resolve().parents[1]


def test_every_setting_is_documented() -> None:
    """docs/configuration.md has a row for every ResilienceSettings field."""
    text = (ROOT / "docs" / "configuration.md").read_text()
    missing = [name for name in ResilienceSettings.model_fields if f"| `{name}` |" not in text]
    assert missing == []


def test_docs_link_only_to_files_that_exist() -> None:
    """Relative links in README, docs/ and adr/ point at files in the repo."""
    import re

    broken = []
    for page in [ROOT / "README.md", *(ROOT / "docs").glob("*.md"), *(ROOT / "adr").glob("*.md")]:
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", page.read_text()):
            if not (page.parent / target).exists():
                broken.append(f"{page.relative_to(ROOT)} -> {target}")
    assert broken == []
