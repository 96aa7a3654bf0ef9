"""Keras layers as NNX modules: the registry and its families (mirroring ``keras/src/layers``).

Importing this package fills :data:`LAYERS`; each family module names the Keras source it
follows. See :mod:`adamjax.convert.layers._base` for what a registered layer provides.
"""

import importlib

from adamjax.convert.layers._base import LAYERS, Layer, register
from adamjax.convert.layers.ops import OPS

# Family modules, imported for their @register side effect. A module not written yet is skipped
# only while the registry is being filled family by family; the tests list every class.
for _family in (
  "core",
  "activations",
  "einsum_dense",
  "convolutional",
  "pooling",
  "reshaping",
  "normalization",
  "regularization",
  "merging",
  "preprocessing",
  "rnn",
  "attention",
):
  try:
    importlib.import_module(f"{__name__}.{_family}")
  except ModuleNotFoundError as e:
    if e.name != f"{__name__}.{_family}":
      raise

__all__ = ["LAYERS", "OPS", "Layer", "register"]
