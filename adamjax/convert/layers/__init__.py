"""Keras layers as NNX modules: the registry and its families (mirroring ``keras/src/layers``).

Importing this package fills :data:`LAYERS` (Keras layer ``class_name`` -> module class) and
:data:`OPS` (``keras.ops`` nodes of Functional graphs); each family module names the Keras source
it follows. See :mod:`adamjax.convert.layers._base` for what a registered layer provides.
"""

# Family modules, imported for their @register side effect.
from adamjax.convert.layers import (  # noqa: F401
  activations,
  attention,
  convolutional,
  core,
  einsum_dense,
  merging,
  normalization,
  pooling,
  preprocessing,
  regularization,
  reshaping,
  rnn,
)
from adamjax.convert.layers._base import LAYERS, Layer, register
from adamjax.convert.layers.ops import OPS

__all__ = ["LAYERS", "OPS", "Layer", "register"]
