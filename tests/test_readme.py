"""README.md runs as written: every Python block, and what can be checked of every command.

- Python blocks (```python) run in the order they appear, each in a fresh interpreter, all in one
  temporary folder, so a block may read the files an earlier block wrote. Keras picks its
  default backend (``KERAS_BACKEND`` is removed), as for a reader who has not chosen one. A block
  preceded by ``<!-- readme-test: skip (reason) -->`` is not run; the reason must be given.
- Shell commands (```bash blocks, and inline code that starts with ``python``, ``scripts/`` or
  ``.venv/bin/``): the script, module or notebook named exists, and every ``--flag`` is one the
  command's own ``--help`` lists (a subcommand's, for ``python -m adamjax.convert to-keras``).
  ``scripts/train`` passes its flags to ``train/mnist.py``; ``scripts/test``'s go to pytest.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
SKIP = re.compile(r"<!--\s*readme-test:\s*skip\s*(?:\((?P<reason>[^)]*)\))?\s*-->")
MARKER_LINE = re.compile(
  r"^[ \t]*<!--\s*readme-test\b.*$", re.M
)  # Any marker on a line of its own.
FENCE = re.compile(r"^```(?P<lang>[\w-]*)\n(?P<body>.*?)^```$", re.M | re.S)
INLINE = re.compile(r"`((?:python |scripts/|\.venv/bin/)[^`]+)`")
BLOCK_TIMEOUT_S = 600
HELP_TIMEOUT_S = 300


def _blocks(text: str) -> list[tuple[str, int, str, str | None]]:
  """(language, first line of the code, code, skip reason or None) for every fenced block."""
  out = []
  for match in FENCE.finditer(text):
    line = text.count("\n", 0, match.start("body")) + 1
    before = text[: match.start()].rstrip().rsplit("\n", 1)[-1]
    skip = SKIP.fullmatch(before.strip())
    reason = None if skip is None else (skip.group("reason") or "").strip()
    out.append((match.group("lang"), line, match.group("body"), reason))
  return out


BLOCKS = _blocks(README.read_text())
PYTHON = [(line, code, reason) for lang, line, code, reason in BLOCKS if lang == "python"]


def _commands() -> list[tuple[int, str]]:
  """(README line, command) for each line of a bash block and each inline command."""
  text = README.read_text()
  out = []
  for lang, line, code, reason in BLOCKS:
    if lang != "bash" or reason is not None:
      continue
    for i, row in enumerate(code.splitlines()):
      command = row.split(" #", 1)[0].strip()
      if command and not command.startswith("#"):
        out.append((line + i, command))
  fenced = [(m.start(), m.end()) for m in FENCE.finditer(text)]
  for match in INLINE.finditer(text):
    if not any(a <= match.start() < b for a, b in fenced):
      out.append((text.count("\n", 0, match.start()) + 1, match.group(1)))
  return out


COMMANDS = _commands()


def test_readme_has_code_and_every_skip_gives_a_reason():
  assert len(PYTHON) >= 3 and len(COMMANDS) >= 10
  markers = MARKER_LINE.findall(README.read_text())
  assert len(markers) == sum(reason is not None for *_, reason in BLOCKS), (
    "a readme-test marker must stand on the line just before a code block"
  )
  for _, line, _, reason in BLOCKS:
    assert reason != "", f"README.md:{line}: readme-test: skip needs a reason in parentheses"


def _python(argv: list[str], cwd: Path, timeout: float, env: dict | None = None):
  return subprocess.run(
    [sys.executable, *argv],
    cwd=cwd,
    env=env,
    capture_output=True,
    text=True,
    timeout=timeout,
    check=False,
  )


def test_python_blocks_run_in_order(tmp_path):
  # As a reader runs them: the installed package, outside the repository, Keras's default backend.
  env = {k: v for k, v in os.environ.items() if k != "KERAS_BACKEND"}
  for line, code, reason in PYTHON:
    if reason is not None:
      continue
    script = tmp_path / f"readme_line_{line}.py"
    script.write_text(code)
    proc = _python([script.name], tmp_path, BLOCK_TIMEOUT_S, env)
    assert proc.returncode == 0, f"README.md:{line}: the block failed:\n{proc.stderr[-6000:]}"


@functools.cache
def _help(*argv: str) -> str:
  proc = _python([*argv, "--help"], ROOT, HELP_TIMEOUT_S)
  assert proc.returncode == 0, f"`python {' '.join(argv)} --help` failed:\n{proc.stderr[-3000:]}"
  return proc.stdout


def _flags(tokens: list[str]) -> list[str]:
  return [t.split("=", 1)[0] for t in tokens if t.startswith("--")]


@pytest.mark.parametrize(
  "line,command", COMMANDS, ids=[f"line{line}-{c.split()[0]}" for line, c in COMMANDS]
)
def test_shell_command_names_what_exists(line, command):
  where = f"README.md:{line}: `{command}`"
  tokens = shlex.split(command.replace("[", " ").replace("]", " "))
  program, args = tokens[0], tokens[1:]
  for token in args:  # Paths into the repository must exist (user files need not).
    if re.match(r"(adamjax|benchmarks|notebooks|scripts|tests|train)/", token):
      assert (ROOT / token).exists(), f"{where}: no {token}"
  if program == "scripts/test":
    assert os.access(ROOT / program, os.X_OK), f"{where}: {program} is not executable"
    return
  if program == "scripts/train":
    assert os.access(ROOT / program, os.X_OK), f"{where}: {program} is not executable"
    program, args = "python", ["train/mnist.py", *args]
  if program.startswith(".venv/bin/"):
    return  # A tool of the environment (jupyter); its notebook path is checked above.
  assert program == "python", f"{where}: unexpected program {program!r}"
  if args[0] == "-m":
    module = args[1]
    assert importlib.util.find_spec(module) is not None, f"{where}: no module {module}"
    cli, rest = ["-m", module], args[2:]
  else:
    assert (ROOT / args[0]).is_file(), f"{where}: no script {args[0]}"
    cli, rest = [args[0]], args[1:]
  flags = _flags(rest)
  if not flags and not (rest and not rest[0].startswith("-")):
    return  # Nothing to check against a --help (and a script without flags may not parse any).
  text = _help(*cli)
  choices = re.search(r"\{([\w,-]+)\}", text)
  if choices and rest and not rest[0].startswith("-"):
    assert rest[0] in choices.group(1).split(","), f"{where}: no subcommand {rest[0]!r}"
    if flags:
      text = _help(*cli, rest[0])
  for flag in flags:
    assert re.search(rf"{re.escape(flag)}\b", text), f"{where}: {flag} is not in its --help"
