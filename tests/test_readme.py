"""The README and the docs as a reader meets them (issue 17).

- Every ```python block of README.md, benchmarks/README.md and docs/*.md runs as written, in a
  fresh interpreter on the CPU, except a block marked on the line just above it with
  ``<!-- not run: needs X -->``, X a peer library, a GPU or downloaded weights (the only reasons
  accepted). A block that needs its earlier lines to run must hold them: each runs alone. No
  block, run or not, ends a line on a bare value (`video.shape`): a script prints nothing for it.
- The two commands CI and users copy are there, character for character.
- Every table says the machine and date it was measured on (a ``**Measured on** ...`` line just
  above it, with the date), or is marked ``<!-- not a measurement: ... -->``.
- Every relative link points at a file (and heading) that exists; the README's top stays short.
"""
from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [p for p in (ROOT / "README.md", ROOT / "benchmarks" / "README.md") if p.exists()] + sorted(
    (ROOT / "docs").glob("*.md"))
NOT_RUN = re.compile(r"^<!--\s*not run:\s*(.*?)\s*-->$")
NOT_MEASUREMENT = re.compile(r"^<!--\s*not a measurement:\s*\S.*-->$")
MEASURED_ON = re.compile(r"^\*\*Measured on\*\* .*\b20\d\d-\d\d-\d\d\b")
# what may keep a block from running here: the peers (tests/integrations runs them), a GPU, weights
NEEDS = ("vector-quantize-pytorch", "phenaki-pytorch", "video-diffusion-pytorch", "magvit2-pytorch", "diffusers",
         "a GPU", "weights")
TWO_COMMANDS = (
    'python3 -m venv .venv && . .venv/bin/activate && pip install torch==2.13.0 && pip install -e ".[models]" '
    "&& python -m pvkernels_models.demo",
    'python3 -m venv .venv && . .venv/bin/activate && pip install torch==2.13.0 && pip install -e ".[test]" '
    "&& python -m pytest tests/ -q",
)


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def _previous_text_line(lines: list[str], i: int) -> str:
    """The nearest non-blank line above line i ('' at the top)."""
    j = i - 1
    while j >= 0 and not lines[j].strip():
        j -= 1
    return lines[j].strip() if j >= 0 else ""


def python_blocks(path: Path) -> list[tuple[int, str, str | None]]:
    """(line of the opening fence, code, why it is not run or None) for each ```python block."""
    lines = path.read_text().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        fence = lines[i].strip()
        if fence.startswith("```"):
            end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == "```"), None)
            assert end is not None, f"{_rel(path)}:{i + 1}: unclosed code fence"
            if fence in ("```python", "```py"):
                marker = NOT_RUN.match(_previous_text_line(lines, i))
                blocks.append((i + 1, "\n".join(lines[i + 1:end]) + "\n", marker.group(1) if marker else None))
            i = end
        i += 1
    return blocks


def _all_blocks():
    return [pytest.param(path, line, code, why, id=f"{_rel(path)}:{line}")
            for path in DOCS for line, code, why in python_blocks(path)]


@pytest.mark.parametrize("path, line, code, why", _all_blocks())
def test_python_block_runs_as_written(path, line, code, why, tmp_path):
    if why is not None:
        pytest.skip(f"{_rel(path)}:{line} is not run here: {why}")
    env = {k: v for k, v in os.environ.items() if k not in ("PVKERNELS_BACKEND", "TRITON_INTERPRET")}
    env["CUDA_VISIBLE_DEVICES"] = ""
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, (
        f"the ```python block at {_rel(path)}:{line} fails as written (fix it, or mark it with "
        f"<!-- not run: needs ... --> if it needs a peer library, a GPU or weights):\n{res.stderr[-3000:]}")


@pytest.mark.parametrize("path, line, code, why", _all_blocks())
def test_no_value_is_left_for_a_console_to_print(path, line, code, why):
    # `video.shape` shows the shape in a REPL and nothing in a script: print what a reader should see
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.Expr) and not isinstance(node.value, (ast.Call, ast.Await, ast.Constant)):
            pytest.fail(f"{_rel(path)}:{line + node.lineno}: `{ast.unparse(node)}` prints nothing in a script")


def test_the_docs_have_runnable_blocks():
    assert sum(why is None for path in DOCS for _, _, why in python_blocks(path)) >= 3


@pytest.mark.parametrize("path", DOCS, ids=_rel)
def test_every_block_not_run_says_why(path):
    lines = path.read_text().splitlines()
    python_fences = {line for line, _, _ in python_blocks(path)}
    for i, text in enumerate(lines):
        marker = NOT_RUN.match(text.strip())
        if not marker:
            continue
        nxt = next((j for j in range(i + 1, len(lines)) if lines[j].strip()), None)
        assert nxt is not None and nxt + 1 in python_fences, (
            f"{_rel(path)}:{i + 1}: a 'not run' marker must sit just above a ```python block")
        why = marker.group(1)
        assert why.startswith("needs ") and any(need in why for need in NEEDS), (
            f"{_rel(path)}:{i + 1}: 'not run: {why}': a block is excepted only when it needs one of {NEEDS}")


def test_the_two_commands_are_as_ci_runs_them():
    readme = (ROOT / "README.md").read_text()
    assert "## The two commands" in readme
    for command in TWO_COMMANDS:
        assert f"```bash\n{command}\n```" in readme, f"README lost the command:\n{command}"


def _tables(lines: list[str]):
    """Line index of each Markdown table's header row."""
    in_code = False
    for i, text in enumerate(lines):
        if text.strip().startswith("```"):
            in_code = not in_code
        elif not in_code and text.startswith("|") and (i == 0 or not lines[i - 1].startswith("|")):
            yield i


@pytest.mark.parametrize("path", DOCS, ids=_rel)
def test_every_table_says_where_and_when_it_was_measured(path):
    lines = path.read_text().splitlines()
    for i in _tables(lines):
        label = _previous_text_line(lines, i)
        assert MEASURED_ON.match(label) or NOT_MEASUREMENT.match(label), (
            f"{_rel(path)}:{i + 1}: a table needs a '**Measured on** <machine>, <YYYY-MM-DD>' line just above "
            f"it (or '<!-- not a measurement: ... -->'); found {label!r}")


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    anchors, in_code = set(), False
    for text in path.read_text().splitlines():
        if text.strip().startswith("```"):
            in_code = not in_code
        elif not in_code and text.startswith("#"):
            anchors.add(_slug(text.lstrip("#")))
    return anchors


@pytest.mark.parametrize("path", DOCS, ids=_rel)
def test_relative_links_resolve(path):
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue
        file, _, anchor = target.partition("#")
        dest = (path.parent / file).resolve() if file else path
        assert dest.exists(), f"{_rel(path)}: link to {target}: no such file"
        if anchor and dest.suffix == ".md":
            assert anchor in _anchors(dest), f"{_rel(path)}: link to {target}: no such heading in {dest.name}"


def test_the_readme_top_is_short():
    # what it is, install, the two commands, a first example per op, the headline figures: the
    # reference sections and the measurement write-ups come after, or in benchmarks/ and docs/
    lines = (ROOT / "README.md").read_text().splitlines()
    first_op = next((i for i, text in enumerate(lines) if text.startswith("## Ops")), None)
    assert first_op is not None, "README: no '## Ops' section (one ### section per op)"
    assert first_op <= 130, f"README: {first_op} lines before the op sections"
    assert any("benchmarks/README.md" in text for text in lines[:first_op])
