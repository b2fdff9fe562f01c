"""Every fenced code block in README.md and docs/*.md runs as written; so do the public API's docstring examples.

Conventions (what a doc author needs to know):

- Each block's opening fence names its language. ```python blocks are executed; ```bash blocks are
  run with `bash -euo pipefail` from the repository root, the venv's bin/ first on PATH; ```text
  blocks are output, listings or diagrams and are not run. A fence without a language fails.
- The python blocks of one file run in order as ONE script in a fresh interpreter, sharing their
  variables, as if a reader pasted the page's blocks top to bottom into one file (a file, not an
  interactive session: MindSpore's graph mode reads the source of a Cell): a later block may use what
  an earlier block of the same page defined (say so in the prose), never what another page defined.
  The script keeps the page's line numbers; the working directory is a temporary folder.
- A block that cannot run here carries the line `<!-- snippet: skip (reason) -->` immediately
  before its opening fence, e.g. `<!-- snippet: skip (needs an Ascend NPU) -->`. The reason is
  required; a marker without one, or not directly followed by a fence, fails. A skipped block is not
  run, so later blocks must not depend on it.
"""
from __future__ import annotations

import doctest
import os
import re
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

import pytest

REPO = Path(__file__).resolve().parent.parent
DOC_FILES = [REPO / "README.md"] + sorted((REPO / "docs").glob("*.md"))
RUN_LANGUAGES = {"python", "bash"}
SHOWN_LANGUAGES = {"text"}
FENCE = re.compile(r"^(\s*)(```+|~~~+)\s*([\w+-]*)\s*$")
MARKER = re.compile(r"^\s*<!--\s*snippet:(.*?)-->\s*$")
SKIP = re.compile(r"^\s*skip\s*\((.*)\)\s*$")
TIMEOUT_S = 600

@dataclass
class Block:
    path: Path
    line: int                   # 1-based line of the opening fence
    language: str
    source: str
    skip_reason: Optional[str]

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(REPO) if self.path.is_relative_to(REPO) else self.path}:{self.line}"


class DocError(ValueError):
    pass


def parse_blocks(path: Path) -> List[Block]:
    """The fenced blocks of a markdown file, with their skip markers; raises DocError on a bad marker."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks, i, pending = [], 0, None       # pending: (line number, reason) of a marker on the previous line
    while i < len(lines):
        marker = MARKER.match(lines[i])
        if marker:
            skip = SKIP.match(marker.group(1))
            if not skip or not skip.group(1).strip():
                raise DocError(f"{path}:{i + 1}: a snippet marker must read `<!-- snippet: skip (reason) -->` "
                               f"with a reason, got {lines[i].strip()!r}")
            pending = (i + 1, skip.group(1).strip())
            i += 1
            continue
        fence = FENCE.match(lines[i])
        if not fence:
            if pending:
                raise DocError(f"{path}:{pending[0]}: a snippet marker must be immediately followed by "
                               f"the opening fence of its block")
            i += 1
            continue
        indent, ticks, language = fence.groups()
        start, body = i, []
        i += 1
        while i < len(lines) and not re.match(rf"^\s*{re.escape(ticks[0])}{{{len(ticks)},}}\s*$", lines[i]):
            body.append(lines[i][len(indent):] if lines[i].startswith(indent) else lines[i])
            i += 1
        if i == len(lines):
            raise DocError(f"{path}:{start + 1}: code block never closed")
        blocks.append(Block(path, start + 1, language.lower(), "\n".join(body) + "\n",
                            pending[1] if pending else None))
        pending = None
        i += 1
    if pending:
        raise DocError(f"{path}:{pending[0]}: a snippet marker at the end of the file marks no block")
    return blocks


def check_languages(blocks: List[Block]) -> None:
    for block in blocks:
        if block.language not in RUN_LANGUAGES | SHOWN_LANGUAGES:
            raise DocError(f"{block.where}: code block language {block.language or '(none)'!r}; use python "
                           f"or bash (run by tests/test_docs.py) or text (output, listings: not run)")


def _environment() -> dict:
    env = dict(os.environ)
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    return env


def page_script(path: Path, blocks: List[Block]) -> str:
    """The page's runnable python blocks as one script in which every line keeps its line number in the
    markdown (other lines are blank), so a traceback's line number is the page's. A real file, not
    exec of a string: MindSpore's graph compiler reads a Cell's source with inspect."""
    lines = [""] * len(path.read_text(encoding="utf-8").splitlines())
    for block in blocks:
        for offset, line in enumerate(block.source.splitlines()):
            lines[block.line + offset] = line
    return "\n".join(lines) + "\n"


def run_page(path: Path, workdir: Path) -> subprocess.CompletedProcess:
    """Runs a page's runnable blocks: its python blocks as one script in a fresh interpreter, then
    each bash block. Returns the first failing process, or the last one (returncode 0) if all pass."""
    blocks = parse_blocks(path)
    check_languages(blocks)
    runnable = [b for b in blocks if b.skip_reason is None and b.language in RUN_LANGUAGES]
    result = subprocess.CompletedProcess([], 0, "", "")
    python = [b for b in runnable if b.language == "python"]
    if python:
        script = workdir / f"{path.name}.py"       # e.g. usage.md.py: line N is usage.md's line N
        script.write_text(page_script(path, python), encoding="utf-8")
        result = subprocess.run([sys.executable, str(script)], cwd=workdir, env=_environment(),
                                capture_output=True, text=True, timeout=TIMEOUT_S)
        if result.returncode:
            result.stderr += f"\nSNIPPET FAILED in {path} (line numbers of {script.name} are the page's)"
            return result
    for block in (b for b in runnable if b.language == "bash"):
        result = subprocess.run(["bash", "-euo", "pipefail", "-c", block.source], cwd=REPO, env=_environment(),
                                capture_output=True, text=True, timeout=TIMEOUT_S)
        if result.returncode:
            result.stderr += f"\nSNIPPET FAILED: {block.where}"
            return result
    return result


@pytest.mark.parametrize("path", DOC_FILES, ids=[str(p.relative_to(REPO)) for p in DOC_FILES])
def test_every_snippet_runs(path, tmp_path):
    result = run_page(path, tmp_path)
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-6000:]}"


def test_skipped_snippets_give_reasons():
    """Lists what is not run and why (visible with -rA / -s); every skip has a reason by construction."""
    skipped = [b for p in DOC_FILES for b in parse_blocks(p) if b.skip_reason is not None]
    for block in skipped:
        print(f"not run: {block.where} ({block.language}): {block.skip_reason}")
    assert all(b.skip_reason for b in skipped)


# -- the runner itself fails on what it must reject ------------------------------------------------

def _page(tmp_path, text):
    path = tmp_path / "page.md"
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def test_runner_fails_on_a_broken_snippet_and_names_it(tmp_path):
    path = _page(tmp_path, """\
        Intro.

        ```python
        lengths = (2, 4)
        ```

        ```python
        print(lengths, grad_of_out)
        ```
        """)
    result = run_page(path, tmp_path)
    assert result.returncode != 0
    assert "NameError" in result.stderr and "grad_of_out" in result.stderr
    assert 'page.md.py", line 8' in result.stderr     # the page's line 8


def test_runner_shares_a_pages_namespace_and_runs_bash(tmp_path):
    path = _page(tmp_path, """\
        ```python
        total = 2 + 2
        ```
        ```python
        assert total == 4
        ```
        ```bash
        test "$(echo ok)" = ok
        ```
        """)
    assert run_page(path, tmp_path).returncode == 0
    failing_bash = _page(tmp_path, "```bash\nfalse\n```\n")
    assert run_page(failing_bash, tmp_path).returncode != 0


def test_runner_skips_marked_blocks_only(tmp_path):
    path = _page(tmp_path, """\
        <!-- snippet: skip (needs an Ascend NPU) -->
        ```python
        raise SystemExit(3)
        ```
        """)
    assert run_page(path, tmp_path).returncode == 0
    assert parse_blocks(path)[0].skip_reason == "needs an Ascend NPU"


@pytest.mark.parametrize("text, words", [
    ("<!-- snippet: skip -->\n```python\npass\n```\n", "with a reason"),
    ("<!-- snippet: skip () -->\n```python\npass\n```\n", "with a reason"),
    ("<!-- snippet: skip (slow) -->\n\n```python\npass\n```\n", "immediately followed"),
    ("<!-- snippet: skip (slow) -->\n", "marks no block"),
    ("```python\npass\n", "never closed"),
])
def test_runner_rejects_bad_markers(tmp_path, text, words):
    with pytest.raises(DocError, match=re.escape(words)):
        parse_blocks(_page(tmp_path, text))


def test_runner_rejects_a_fence_without_language(tmp_path):
    with pytest.raises(DocError, match="language"):
        run_page(_page(tmp_path, "```\nls\n```\n"), tmp_path)


# -- docstring examples of the public API ----------------------------------------------------------

def _public_objects():
    import ms_nsa
    return [ms_nsa.nsa_select_attention, ms_nsa.check_inputs, ms_nsa.nn.NsaSelectAttention,
            ms_nsa.nn.NativeSparseAttention]


@pytest.mark.parametrize("index", range(4), ids=["nsa_select_attention", "check_inputs", "NsaSelectAttention",
                                                   "NativeSparseAttention"])
def test_docstring_examples_run(index):
    obj = _public_objects()[index]
    tests = doctest.DocTestFinder(recurse=False).find(obj, obj.__name__, globs={})
    assert tests and tests[0].examples, f"{obj.__name__} has no docstring example"
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    for test in tests:
        runner.run(test)
    assert runner.summarize(verbose=False).failed == 0
