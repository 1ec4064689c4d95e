"""The documentation's code runs: every ```python block in docs/**/*.md is executed.

The blocks of one file run in order in one namespace (a later block may use names an earlier one made), as one test
per file, in a fresh temporary working directory. A failing block fails the test with the file, the block's number
(1-based, counted within that file) and its line, and the block's traceback.

A block that is Python but not meant to run (it needs a checkpoint or data on disk, an mpirun launch, or names the
surrounding text leaves undefined) is fenced ```python-norun instead of ```python; ```text, ```bash and plain ```
blocks are never run. Every page of docs/derivations/ must end its derivation with at least one runnable block that
checks its result.
"""

from __future__ import annotations

import re
import traceback
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parent.parent / "docs"
OPEN = re.compile(r"^(\s*)```python\s*$")  # exactly ```python: ```python-norun does not match


def python_blocks(path: Path) -> list[tuple[int, str]]:
    """[(line number of the opening fence, source)] of every ```python block of a Markdown file."""
    blocks, lines = [], path.read_text(encoding="utf-8").splitlines()
    k = 0
    while k < len(lines):
        opening = OPEN.match(lines[k])
        if opening:
            indent, start, body = len(opening.group(1)), k + 1, []
            k += 1
            while k < len(lines) and lines[k].strip() != "```":
                body.append(lines[k][indent:] if lines[k][:indent].isspace() else lines[k])
                k += 1
            if k == len(lines):
                raise ValueError(f"{path}: the ```python block opened on line {start} is never closed")
            blocks.append((start, "\n".join(body) + "\n"))
        k += 1
    return blocks


def _pages_with_blocks() -> list[Path]:
    return [p for p in sorted(DOCS.rglob("*.md")) if python_blocks(p)]


def _id(path: Path) -> str:
    return str(path.relative_to(DOCS))


@pytest.mark.parametrize("page", _pages_with_blocks(), ids=_id)
def test_python_blocks_run(page, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__docs__"}
    for number, (line, source) in enumerate(python_blocks(page), start=1):
        code = compile("\n" * line + source, str(page), "exec")  # tracebacks give the page's own line numbers
        try:
            exec(code, namespace)
        except BaseException as exc:  # SystemExit too: a block must not end the test run
            pytest.fail(f"{_id(page)}: python block {number} (opened on line {line}) failed: "
                        f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}", pytrace=False)


def test_every_derivation_page_has_a_runnable_check():
    missing = [_id(p) for p in sorted((DOCS / "derivations").glob("*.md")) if not python_blocks(p)]
    assert not missing, f"derivation pages without a ```python block that checks their result: {missing}"


def test_the_block_parser_sees_python_only(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("text\n```python\nx = 1\n```\n```python-norun\nraise SystemExit\n```\n```text\nno\n```\n"
                    "  ```python\n  y = x + 1\n  ```\n", encoding="utf-8")
    assert python_blocks(page) == [(2, "x = 1\n"), (11, "y = x + 1\n")]
    page.write_text("```python\nx = 1\n", encoding="utf-8")
    with pytest.raises(ValueError, match="never closed"):
        python_blocks(page)


IMAGE = re.compile(r"!\[[^\]]*\]\(([^)\s]+)\)")


def test_every_image_a_page_shows_exists_and_is_small():
    for page in sorted(DOCS.rglob("*.md")):
        for target in IMAGE.findall(page.read_text(encoding="utf-8")):
            image = (page.parent / target).resolve()
            assert image.is_file(), f"{_id(page)} shows {target}, which does not exist"
            assert image.stat().st_size < 150_000, f"{_id(page)} shows {target}: {image.stat().st_size} bytes"


def test_make_figures_writes_the_three_figures(tmp_path):
    pytest.importorskip("matplotlib")
    import runpy

    runpy.run_path(str(DOCS / "figures" / "make_figures.py"), run_name="__docs__")["main"](tmp_path)
    written = sorted(p.name for p in tmp_path.glob("*.png"))
    assert written == ["attention_backward.png", "gelu_vs_silu.png", "lr_schedule.png"]
    for png in tmp_path.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size < 150_000, png.name
