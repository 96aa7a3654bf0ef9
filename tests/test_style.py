"""The repository has one format and one lint configuration (ruff, set in pyproject.toml).

The README's test command fails when a file drifts from `ruff format` or breaks a `ruff check` rule.
"""

import pathlib
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _ruff() -> list[str]:
  exe = shutil.which("ruff", path=str(pathlib.Path(sys.executable).parent))
  return [exe] if exe else [sys.executable, "-m", "ruff"]


@pytest.mark.parametrize(
  "args", [["format", "--check", "--diff"], ["check"]], ids=["format", "lint"]
)
def test_ruff(args):
  result = subprocess.run(
    [*_ruff(), *args, "."], cwd=ROOT, capture_output=True, text=True, check=False
  )
  assert result.returncode == 0, (
    f"ruff {' '.join(args)} found drift:\n{result.stdout}{result.stderr}"
  )
