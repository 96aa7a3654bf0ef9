"""The child side of ``call_in_keras_backend``: ``python -P _keras_child.py SCRIPT FUNCTION
BACKEND FOLDER`` loads SCRIPT by path, calls FUNCTION(arrays, spec) with FOLDER's
``inputs.npz`` and ``spec.json``, and writes what it returns to FOLDER/``outputs.npz``.

Standard library and NumPy only: the child imports what the worker file imports, and nothing of
the ``adamjax`` package unless the worker does.
"""

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np


def main(script: str, function: str, backend: str, folder: str) -> None:
  path, folder = Path(script), Path(folder)
  module_spec = importlib.util.spec_from_file_location(path.stem, path)
  module = importlib.util.module_from_spec(module_spec)
  sys.modules[path.stem] = module  # Dataclasses and pickling look their module up by name.
  module_spec.loader.exec_module(module)
  with np.load(folder / "inputs.npz", allow_pickle=False) as data:
    arrays = {k: data[k] for k in data.files}
  spec = json.loads((folder / "spec.json").read_text())
  result = getattr(module, function)(arrays, spec)
  keras = sys.modules.get("keras")
  if keras is not None and keras.backend.backend() != backend:
    sys.exit(f"{path.name}:{function} ran Keras on {keras.backend.backend()!r}, not {backend!r}")
  np.savez(folder / "outputs.npz", **{k: np.asarray(v) for k, v in dict(result).items()})


if __name__ == "__main__":
  main(*sys.argv[1:])
