"""Per-layer parity: a live Keras layer (JAX backend, in this process) against its built module.

``check_layer(keras_layer, inputs)`` builds the Keras layer on ``inputs``, rebuilds it from
``get_config()`` and its weights through the converter's registry (checking that the registry's
variable list names every Keras weight, in order), runs both jitted and returns both outputs.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from flax import nnx

from adamjax.convert.layers import LAYERS


def build_module(keras_layer: Any):
  """The registry's module for a built Keras layer, with the layer's own weights."""
  config = keras_layer.get_config()
  cls = LAYERS[type(keras_layer).__name__]
  names = cls.variables(config)
  weights = [np.asarray(w) for w in keras_layer.weights]
  assert len(names) == len(weights), (names, [w.path for w in keras_layer.weights])
  for name, w in zip(names, keras_layer.weights, strict=True):
    assert w.path.endswith(name.rsplit("/", 1)[-1]), (name, w.path)
    assert (name in cls.non_trainable(config)) != w.trainable, name
  return cls(config, dict(zip(names, weights, strict=True)))


def run_both(keras_layer: Any, *inputs: Any, training: bool = False, **kwargs: Any):
  """``(keras outputs, module outputs)`` for the same inputs, both jitted, as NumPy."""
  import keras

  keras_layer(*inputs, **kwargs)  # builds it
  module = build_module(keras_layer)

  @jax.jit
  def keras_fn(*args):
    return keras_layer(*args, training=training, **kwargs)

  graphdef, state = nnx.split(module)

  @jax.jit
  def ours(state, *args):
    return nnx.merge(graphdef, state)(*args, training=training, **kwargs)

  del keras
  expected = jax.tree.map(np.asarray, keras_fn(*inputs))
  got = jax.tree.map(np.asarray, ours(state, *inputs))
  return expected, got
