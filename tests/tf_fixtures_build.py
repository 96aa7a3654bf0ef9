"""Checkpoint fixtures written by a TensorFlow-backend Keras subprocess, built once per test run.

``fixtures_keras.py`` and ``fixtures_tf.py`` run in their own process (one process holds one
Keras backend, and the tests' is JAX) and write their files, with a ``manifest.json`` last.
"""

import fcntl
import os
import shutil
import subprocess
import sys
from pathlib import Path


def run_tf_backend_script(script: Path, *args: str) -> None:
  """Runs ``script`` with Keras on the TensorFlow backend; raises with its stderr if it fails."""
  env = dict(os.environ, KERAS_BACKEND="tensorflow", TF_CPP_MIN_LOG_LEVEL="2")
  proc = subprocess.run(
    [sys.executable, str(script), *args],
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
    check=False,
  )
  if proc.returncode:
    raise RuntimeError(f"{script.name} {' '.join(args)} failed:\n{proc.stderr[-6000:]}")


def build_once(tmp_path_factory, name: str, script: Path, *args: str) -> Path:
  """``script [*args] OUT``, once per test run, into the run's shared temporary folder.

  Under pytest-xdist every worker has its own session, so the build goes to the run's shared
  base directory under a file lock: the first worker builds, the others wait and reuse it.
  """
  base = tmp_path_factory.getbasetemp()
  if os.environ.get("PYTEST_XDIST_WORKER"):
    base = base.parent
  out = base / name
  with open(base / f"{name}.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not (out / "manifest.json").is_file():  # Written last: the build finished.
      shutil.rmtree(out, ignore_errors=True)
      run_tf_backend_script(script, *args, str(out))
  return out
