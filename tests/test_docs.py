"""The documentation holds: the generated configuration page is current, links resolve, the README stays short
and names only make targets that exist."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from urllib.parse import unquote

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))


LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.M | re.S)


def _links(path: Path) -> list[str]:
    text = FENCE.sub("", path.read_text(encoding="utf-8"))
    text = re.sub(r"`[^`\n]*`", "", text)  # code spans are not links
    return LINK.findall(text)


def test_configuration_page_is_current():
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "gen_config_docs.py"), "--check"],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, (
        "docs/configuration.md is stale: run ~/.cache/serve-venv/bin/python tools/gen_config_docs.py\n"
        + result.stderr)


def test_check_fails_on_a_stale_page(tmp_path):
    stale = tmp_path / "configuration.md"
    stale.write_text("# Configuration reference\n", encoding="utf-8")
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "gen_config_docs.py"), "--check",
                             "--output", str(stale)], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 1


def test_relative_links_resolve():
    missing = []
    for page in [README, *DOCS]:
        for target in _links(page):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
                continue  # a URL or an anchor in the same page
            file = unquote(target.split("#", 1)[0])
            resolved = (page.parent / file).resolve()
            if resolved.exists():
                continue
            missing.append(f"{page.relative_to(ROOT)}: {target}")
    assert not missing, "links to files that don't exist:\n" + "\n".join(missing)


def test_links_are_found():
    """The link pattern finds the README's docs index (so the test above checks something)."""
    targets = _links(README)
    assert "docs/configuration.md" in targets and "docs/testing.md" in targets


def test_readme_is_short():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 250, f"README.md has {len(lines)} lines; move reference material to docs/"


def test_readme_make_targets_exist():
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    targets = set(re.findall(r"^([A-Za-z0-9_.-]+)\s*:(?!=)", makefile, re.M))
    named = set(re.findall(r"\bmake\s+([A-Za-z0-9_.-]+)", README.read_text(encoding="utf-8")))
    assert named, "the README names no make target"
    unknown = sorted(named - targets)
    assert not unknown, f"the README names make targets the Makefile lacks: {unknown}"
