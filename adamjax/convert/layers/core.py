"""Keras's core layers: Dense, Embedding, Masking, Identity (``keras/src/layers/core``)."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp

from adamjax.convert.layers._base import Layer, register
from adamjax.convert.layers.activations import get_activation


@register("Dense")
class Dense(Layer):
  """``keras/src/layers/core/dense.py``: ``activation(matmul(x, kernel) + bias)``."""

  supports_masking = True

  @classmethod
  def variables(cls, config):
    return ("kernel", "bias") if config.get("use_bias", True) else ("kernel",)

  def __init__(self, config, weights):
    super().__init__(config, weights)
    self.use_bias = bool(config.get("use_bias", True))
    self.activation = get_activation(config.get("activation"))

  def __call__(self, inputs, *, training=False, mask=None, rngs=None):
    x = jnp.matmul(inputs, self.cast(self.kernel.value))
    if self.use_bias:
      x = jnp.add(x, self.cast(self.bias.value))
    return self.activation(x)


@register("Identity")
class Identity(Layer):
  supports_masking = True

  def __call__(self, inputs: Any, *, training=False, mask=None, rngs=None):
    return inputs
