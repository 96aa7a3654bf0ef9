"""Keras's core layers: Dense, Embedding, Masking, Identity (``keras/src/layers/core``)."""

from __future__ import annotations

from numbers import Real
from typing import Any

import jax
import jax.numpy as jnp

from adamjax.convert._ir import ConversionError
from adamjax.convert.layers._base import Layer, option, register
from adamjax.convert.layers.activations import get_activation


def rank_as(value: jax.Array, ndim: int) -> jax.Array:
  """``value`` with leading size-1 axes up to ``ndim``: the broadcast Keras leaves implicit,
  spelled out so the module also runs under ``jax_numpy_rank_promotion="raise"``."""
  return jnp.reshape(value, (1,) * (ndim - value.ndim) + value.shape)


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
    x = jnp.matmul(inputs, self.cast(self.kernel[...]))
    if self.use_bias:
      x = jnp.add(x, rank_as(self.cast(self.bias[...]), x.ndim))
    return self.activation(x)


@register("Identity")
class Identity(Layer):
  """``keras/src/layers/core/identity.py``: the inputs, mask passed on."""

  supports_masking = True

  def __call__(self, inputs: Any, *, training=False, mask=None, rngs=None):
    return inputs


@register("Embedding")
class Embedding(Layer):
  """``keras/src/layers/core/embedding.py``: ``take(embeddings, inputs, axis=0)`` cast to the
  compute dtype (non-integer ids are first cast to int32). With ``mask_zero`` the output mask is
  ``inputs != 0`` and the layer supports masking; without it, it supports none."""

  flax_names = {"embeddings": "embedding"}

  @classmethod
  def variables(cls, config):
    return ("embeddings",)

  def __init__(self, config, weights):
    super().__init__(config, weights)
    for key in ("input_dim", "output_dim"):
      value = option(config, key, int, None)
      if value is None or value <= 0:
        raise ConversionError(f"config {key} = {config.get(key)!r} is not a positive integer")
    shape = (config["input_dim"], config["output_dim"])
    if tuple(self.embedding[...].shape) != shape:
      raise ConversionError(
        f"embeddings of shape {tuple(self.embedding[...].shape)} do not match "
        f"input_dim, output_dim = {shape}"
      )
    self.mask_zero = bool(option(config, "mask_zero", bool, False))
    # Keras sets supports_masking = mask_zero on the instance.
    self.supports_masking = self.mask_zero

  def __call__(self, inputs, *, training=False, mask=None, rngs=None):
    if inputs.dtype != jnp.int32 and inputs.dtype != jnp.int64:
      inputs = inputs.astype(jnp.int32)
    # Keras does not autocast the table (autocast=False): gather, then cast the rows.
    outputs = jnp.take(self.embedding[...], inputs, axis=0)
    return outputs.astype(self.compute_dtype)

  def compute_mask(self, inputs, mask):
    if not self.mask_zero:
      return None
    return jnp.not_equal(inputs, 0)


@register("Masking")
class Masking(Layer):
  """``keras/src/layers/core/masking.py``: a time step (all but the last axis) whose features all
  equal ``mask_value`` is set to 0 and masked out (mask: ``any(x != mask_value, axis=-1)``)."""

  supports_masking = True

  def __init__(self, config, weights):
    super().__init__(config, weights)
    value = config.get("mask_value", 0.0)
    if not isinstance(value, Real) or isinstance(value, bool):
      raise ConversionError(f"config mask_value = {value!r} is not a number")
    self.mask_value = float(value) if not isinstance(value, int) else value

  def __call__(self, inputs, *, training=False, mask=None, rngs=None):
    boolean_mask = jnp.any(jnp.not_equal(inputs, self.mask_value), axis=-1, keepdims=True)
    return jnp.where(boolean_mask, inputs, 0)

  def compute_mask(self, inputs, mask):
    return jnp.any(jnp.not_equal(inputs, self.mask_value), axis=-1)
