"""The README and docs/ stay a user's pages: every relative link resolves, the README stays short (<= 350 lines),
and the README's file tree names only paths that exist."""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")  # [text](target): markdown links and images


def relative_links(page: Path) -> list[str]:
    """The relative link targets of a markdown page, without their #anchor; code blocks are skipped."""
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    targets = [t.split("#", 1)[0] for t in LINK.findall(text)]
    return [t for t in targets if t and not re.match(r"[a-z]+:", t)]  # http:, https:, mailto: are not files


def tree_paths(readme: str) -> list[str]:
    """The paths the README's "## Files" tree names: an unindented line is a top-level path, an indented line is
    inside the last unindented folder (a name ending in /)."""
    section = readme.split("\n## Files", 1)[1].split("\n## ", 1)[0]
    block = section.split("```", 2)[1]
    paths, folder = [], ""
    for line in block.splitlines():
        if not line.strip():
            continue
        name = line.split()[0]
        if line.startswith(" "):
            paths.append(folder + name)
        else:
            paths.append(name)
            folder = name if name.endswith("/") else ""
    return paths


@pytest.mark.parametrize("page", PAGES, ids=[p.relative_to(ROOT).as_posix() for p in PAGES])
def test_every_relative_link_resolves(page):
    missing = [t for t in relative_links(page) if not (page.parent / t).exists()]
    assert not missing, f"{page.relative_to(ROOT)} links to files that do not exist: {missing}"


def test_relative_links_finds_links_and_skips_urls_and_code(tmp_path):
    page = tmp_path / "p.md"
    page.write_text("[a](docs/a.md#x) ![b](b.png) [c](https://x.org/y) <x>\n```\n[d](not/a/link.md)\n```\n")
    assert relative_links(page) == ["docs/a.md", "b.png"]  # the URL and the code block are not followed


def test_the_readme_is_at_most_350_lines():
    n = len(README.read_text().splitlines())
    assert n <= 350, f"README.md has {n} lines; depth goes to docs/ (one page per topic)"


def test_the_readme_file_tree_names_only_paths_that_exist():
    paths = tree_paths(README.read_text())
    assert len(paths) >= 20 and "cord.py" in paths and "cordkit/chunked.py" in paths
    missing = [p for p in paths if not (ROOT / p).exists()]
    assert not missing, f"README's file tree names paths that do not exist: {missing}"


def test_tree_paths_puts_indented_lines_in_their_folder():
    readme = "x\n## Files\n\n```\na.py   what\nd/     a folder\n  b.py  in d\ne.txt  top\n```\n## Next\n"
    assert tree_paths(readme) == ["a.py", "d/", "d/b.py", "e.txt"]  # one row per line, b.py inside d/
