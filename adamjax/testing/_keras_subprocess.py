"""Keras on another backend, in a fresh Python process, exchanging arrays as ``.npz`` files.

A process holds one Keras backend (chosen at the first ``import keras``), so a JAX process that
wants Keras on TensorFlow, or a Keras run that must not share a process with JAX, starts a
subprocess with ``KERAS_BACKEND`` set. :func:`call_in_keras_backend` is the whole exchange:
arrays go in as one ``.npz``, a JSON-able spec beside them, a function in a given ``.py`` file
runs there and the arrays it returns come back, read without pickles.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

_CHILD = Path(__file__).with_name("_keras_child.py")
_STDERR_TAIL = 6000


class KerasSubprocessError(RuntimeError):
  """The subprocess exited non-zero; the message holds the command and the end of its stderr."""


def run_in_keras_backend(
  backend: str,
  args: Sequence[str | os.PathLike],
  *,
  timeout: float | None = 600.0,
  pythonpath: Sequence[str | os.PathLike] = (),
  env: Mapping[str, str] | None = None,
  cwd: str | os.PathLike | None = None,
) -> subprocess.CompletedProcess:
  """Runs ``python *args`` with ``KERAS_BACKEND=backend`` and returns its completed process.

  Args:
    backend: ``"tensorflow"``, ``"jax"`` or ``"torch"``.
    args: the interpreter's arguments (a script and its arguments, ``-m module``, ...).
    timeout: seconds before the process is killed (``subprocess.TimeoutExpired``); None waits.
    pythonpath: folders put first on the child's ``PYTHONPATH``.
    env: extra environment variables (``TF_CPP_MIN_LOG_LEVEL`` is 2 unless given).
    cwd: the child's working directory (default: this process's).

  Returns:
    The ``subprocess.CompletedProcess`` (stdout and stderr captured as text).

  Raises:
    KerasSubprocessError: the process exited non-zero; the message ends with its stderr.
  """
  child_env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
  child_env.update(env or {})
  child_env["KERAS_BACKEND"] = backend
  paths = [os.fspath(p) for p in pythonpath]
  if child_env.get("PYTHONPATH"):
    paths.append(child_env["PYTHONPATH"])
  if paths:
    child_env["PYTHONPATH"] = os.pathsep.join(paths)
  argv = [sys.executable, *map(os.fspath, args)]
  proc = subprocess.run(
    argv, env=child_env, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False
  )
  if proc.returncode != 0:
    shown = " ".join(argv[1:])
    raise KerasSubprocessError(
      f"`python {shown}` with KERAS_BACKEND={backend} failed with exit code "
      f"{proc.returncode}; stderr:\n{proc.stderr[-_STDERR_TAIL:]}"
    )
  return proc


def call_in_keras_backend(
  backend: str,
  script: str | os.PathLike,
  function: str,
  arrays: Mapping[str, Any] | None = None,
  spec: Mapping[str, Any] | None = None,
  *,
  timeout: float | None = 600.0,
  pythonpath: Sequence[str | os.PathLike] = (),
  env: Mapping[str, str] | None = None,
) -> dict[str, np.ndarray]:
  """Calls ``function(arrays, spec)`` from the file ``script`` under Keras on ``backend``.

  The child is a fresh Python (``-P``: the script's folder is not put on ``sys.path``) that loads
  ``script`` by path, without importing the package it sits in (a worker file's imports are its
  own, so the subprocess starts no faster than they allow). ``function`` receives the
  arrays (read with ``allow_pickle=False``) and ``spec`` (through JSON), and returns a mapping of
  names to arrays, which come back the same way. Errors raised there come back as
  :class:`KerasSubprocessError` with the child's traceback.

  Args:
    backend: the Keras backend of the child (``KERAS_BACKEND``); checked after the call when the
      function imported Keras.
    script: path of a ``.py`` file holding ``function``.
    function: a module-level function ``(dict[str, np.ndarray], dict) -> Mapping[str, array]``.
    arrays: inputs, saved with ``np.savez`` (numeric, bool or fixed-width string arrays).
    spec: JSON-able settings.
    timeout, pythonpath, env: as for :func:`run_in_keras_backend` (``pythonpath`` is where the
      script's own imports are found).

  Returns:
    The function's result as NumPy arrays.

  Example (``worker.py`` holds ``def logits(arrays, spec): ...``)::

    out = call_in_keras_backend("tensorflow", "worker.py", "logits", {"x": x}, {"seed": 0})
  """
  with tempfile.TemporaryDirectory(prefix=f"keras_{backend}_") as tmp:
    folder = Path(tmp)
    np.savez(folder / "inputs.npz", **{k: np.asarray(v) for k, v in (arrays or {}).items()})
    (folder / "spec.json").write_text(json.dumps(dict(spec or {})))
    run_in_keras_backend(
      backend,
      ["-P", _CHILD, Path(script).resolve(), function, backend, folder],
      timeout=timeout,
      pythonpath=pythonpath,
      env=env,
    )
    with np.load(folder / "outputs.npz", allow_pickle=False) as out:
      return {k: out[k] for k in out.files}
