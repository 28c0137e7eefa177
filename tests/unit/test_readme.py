"""The README is a short guide and every document points at things that exist.

- every metric name, CLI command and README section users rely on is documented;
- the README stays a guide (a length bound), not a diary;
- every relative Markdown link and every repository path written in backticks in README.md and
  docs/*.md names a file or folder that exists.
"""

from __future__ import annotations

import re
from pathlib import Path

from services.common import metrics
from tandem.cli import SUBCOMMANDS

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
DOCS = sorted((ROOT / "docs").glob("*.md"))
MAX_README_LINES = 320

# Top-level folders and files of the repository: a backticked word starting with one of them is a
# path claim that must hold.
TOP_LEVEL = {p.name for p in ROOT.iterdir() if not p.name.startswith(".")} - {"models"}
LINK = re.compile(r"\]\(([^)\s]+)\)")
CODE = re.compile(r"`([^`\n]+)`")
PLACEHOLDER = re.compile(r"[*{}<>$]|\.\.\.|\bN\b|_r\d+\.|_date>|/$")


def _documents() -> list[Path]:
    return [ROOT / "README.md", *DOCS]


def test_every_metric_is_documented() -> None:
    text = "\n".join(p.read_text() for p in _documents())
    missing = [spec.name for spec in metrics.METRICS if f"`{spec.name}`" not in text]
    assert not missing, f"metrics missing from the docs: {missing}"


def test_every_command_is_documented() -> None:
    for name in SUBCOMMANDS:
        assert f"`tandem {name}`" in README


def test_sections() -> None:
    for heading in ("## Map of the code", "## Quick start", "## Try it", "## Limits", "## Benchmarks"):
        assert heading in README
    # the map of the code comes first, before the how-to sections
    assert README.index("## Map of the code") < README.index("## Quick start")


def test_readme_is_a_guide() -> None:
    num_lines = README.count("\n")
    assert num_lines <= MAX_README_LINES, f"README.md has {num_lines} lines (bound {MAX_README_LINES})"
    # no block of 20 or more lines appears twice
    lines = README.split("\n")
    seen: dict[str, int] = {}
    for i in range(len(lines) - 20):
        block = "\n".join(lines[i : i + 20])
        if block.strip() and block in seen:
            raise AssertionError(f"README lines {seen[block] + 1}.. repeat at line {i + 1}")
        seen.setdefault(block, i)


def _link_targets(doc: Path) -> list[str]:
    text = doc.read_text()
    targets = []
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue  # URLs and in-page anchors
        targets.append(target.split("#", 1)[0])
    return targets


def test_relative_links_exist() -> None:
    broken = [
        f"{doc.relative_to(ROOT)} -> {target}"
        for doc in _documents()
        for target in _link_targets(doc)
        if target and not (doc.parent / target).exists()
    ]
    assert not broken, "links to missing files:\n" + "\n".join(broken)


def _path_claims(doc: Path) -> list[str]:
    claims = []
    for code in CODE.findall(doc.read_text()):
        for word in code.split():
            word = word.strip("(),;:'\"")
            first = word.split("/", 1)[0]
            if "/" not in word or first not in TOP_LEVEL or PLACEHOLDER.search(word):
                continue
            claims.append(word.split(":", 1)[0].split("::", 1)[0])
    return claims


def test_repository_paths_exist() -> None:
    missing = [
        f"{doc.relative_to(ROOT)}: {claim}"
        for doc in _documents()
        for claim in _path_claims(doc)
        if not (ROOT / claim).exists()
    ]
    assert not missing, "documents name paths that do not exist:\n" + "\n".join(missing)


def test_no_document_cites_missing_notes() -> None:
    for path in [*_documents(), *ROOT.glob("kernels/**/*.py"), *ROOT.glob("services/**/*.py")]:
        assert "notes/kernel_api.md" not in path.read_text(), path
