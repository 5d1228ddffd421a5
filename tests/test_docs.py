"""The README is a front page and the manual's links all lead somewhere.

Every relative link in `README.md`, `docs/*.md` and `bench/README.md` (`[text](path)`,
`[text](path#anchor)`, `[text](#anchor)`) must name a file of the repository, and an anchor
must be one that a heading of the target makes under GitHub's rule: lowercase, punctuation
other than hyphens and spaces dropped, spaces turned into hyphens, and `-1`, `-2`, ... after
repeats. Links inside code (fenced or indented blocks, `inline spans`) are not links.
"""

import re
from pathlib import Path

import pytest
from conftest import REPO

README_MAX_LINES = 250
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
FENCE = re.compile(r"^ {0,3}(```|~~~)")


def documents() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "bench" / "README.md"]


def prose_lines(text: str) -> list[str]:
    """The lines outside fenced and indented code blocks, inline code spans blanked."""
    lines, fenced, previous_blank = [], False, True
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
            lines.append("")
            continue
        indented = line.startswith(("    ", "\t")) and previous_blank and line.strip()
        if fenced or indented:
            lines.append("")
            continue  # an indented block continues until a line that is not indented
        previous_blank = not line.strip()
        lines.append(re.sub(r"`[^`]*`", "``", line))
    return lines


def slug(heading: str) -> str:
    """GitHub's anchor for a heading's text."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text stays
    text = re.sub(r"[^\w\- ]", "", text.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    made, seen = set(), {}
    text = path.read_text()
    for raw, line in zip(text.splitlines(), prose_lines(text), strict=True):
        if not line.strip():
            continue
        match = HEADING.match(raw)
        if match:
            base = slug(match.group(2))
            count = seen.get(base, 0)
            seen[base] = count + 1
            made.add(base if count == 0 else f"{base}-{count}")
    return made


def links(path: Path) -> list[tuple[int, str]]:
    found = []
    for number, line in enumerate(prose_lines(path.read_text()), start=1):
        found.extend((number, match.group(1)) for match in LINK.finditer(line))
    return found


def broken_links(path: Path) -> list[str]:
    """'FILE:LINE: TARGET: why' for each relative link of `path` that leads nowhere."""
    problems = []
    for number, target in links(path):
        if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target) or target.startswith("//"):
            continue  # http:, https:, mailto: ...: not the repository's
        file_part, _, anchor = target.partition("#")
        destination = (path.parent / file_part).resolve() if file_part else path
        where = f"{path.relative_to(REPO)}:{number}: {target}"
        if file_part.startswith("/"):
            problems.append(f"{where}: an absolute path; link relative to the file")
        elif not destination.exists():
            problems.append(f"{where}: {file_part} does not exist")
        elif REPO not in destination.parents and destination != REPO:
            problems.append(f"{where}: leads outside the repository")
        elif anchor and destination.suffix == ".md" and anchor not in anchors(destination):
            problems.append(f"{where}: no heading of {destination.relative_to(REPO)} makes "
                            f"#{anchor}")
        elif anchor and destination.is_dir():
            problems.append(f"{where}: an anchor on a directory")
    return problems


@pytest.mark.parametrize("path", documents(), ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_leads_somewhere(path):
    assert path.is_file()
    problems = broken_links(path)
    assert not problems, "\n".join(problems)


def test_readme_is_a_front_page():
    lines = (REPO / "README.md").read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, (
        f"README.md has {len(lines)} lines, at most {README_MAX_LINES}: move the manual's "
        "text to docs/")
    text = "\n".join(lines)
    # The two commands come first: install and train, install and test.
    first_block = text.index("\n    ")
    assert first_block < text.index("\n## ", text.index("## Quick start") + 1)
    assert "python -m scaling.main --experiment=fashion_mnist_mlp" in text
    assert "python -m pytest" in text


def test_the_layout_table_names_files_that_exist():
    """'Where things live' is taken from the code: every path it names, and every module a row
    names inside its folder, is there."""
    section = (REPO / "README.md").read_text().split("## Where things live")[1].split("\n## ")[0]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    assert len(rows) >= 10, "the layout table is missing"
    missing = []
    for row in rows:
        path_cell, responsibility = [cell.strip() for cell in row.strip("|").split("|")][:2]
        paths = re.findall(r"`([^`]+)`", path_cell)
        missing += [path for path in paths if not (REPO / path).exists()]
        folder = REPO / paths[0] if paths[0].endswith("/") else (REPO / paths[0]).parent
        missing += [f"{folder.relative_to(REPO)}/{name}"
                    for name in re.findall(r"`(\w+\.py)`", responsibility)
                    if not (folder / name).exists()]
    assert not missing, f"the README's layout table names what is not there: {missing}"


def test_every_manual_page_is_linked_from_the_readme():
    linked = {(REPO / target.partition("#")[0]).resolve()
              for _, target in links(REPO / "README.md") if not target.startswith("#")}
    pages = set((REPO / "docs").glob("*.md"))
    missing = sorted(str(page.relative_to(REPO)) for page in pages if page.resolve() not in linked)
    assert not missing, f"pages of docs/ the README does not link: {missing}"


def test_the_checker_finds_what_is_broken(tmp_path, monkeypatch):
    """The checks above can fail: a missing file, a missing anchor and a link into a code
    block are told apart on a page made for it."""
    monkeypatch.setattr(f"{__name__}.REPO", tmp_path)
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "page.md").write_text(
        "# A page\n\n## Text corpora: `--mode=prepare`\n\n## Notes\n\n## Notes\n")
    readme = tmp_path / "README.md"
    readme.write_text(
        "# Front\n\n## Quick start\n\n"
        "[ok](docs/page.md) [ok](docs/page.md#text-corpora---modeprepare) "
        "[ok](docs/page.md#notes-1) [ok](#quick-start) [web](https://example.com/x#y)\n"
        "[gone](docs/missing.md) [no anchor](docs/page.md#text-corpora) [self](#nowhere)\n\n"
        "    [in code](docs/missing.md)\n\n"
        "`[inline](docs/missing.md)`\n")
    problems = broken_links(readme)
    assert [p.split(": ")[1] for p in problems] == [
        "docs/missing.md", "docs/page.md#text-corpora", "#nowhere"], problems
    assert all(p.startswith("README.md:6: ") for p in problems), problems
