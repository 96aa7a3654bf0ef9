"""Keras's regularization layers (``keras/src/layers/regularization``): Dropout,
SpatialDropout1D/2D/3D, GaussianNoise, GaussianDropout, AlphaDropout, ActivityRegularization.

In inference they are the identity. In training they draw from ``rngs.dropout()`` with the
``jax.random`` calls of ``keras/src/backend/jax/random.py`` (``bernoulli``, ``normal``,
``uniform``) and combine the draw with the inputs in Keras's order, so that given the same key
(Keras's key is its ``SeedGenerator`` state, ``[seed, counter]``) the output is Keras's bit for
bit. The file's ``seed`` is not used: the caller's ``rngs`` decides the randomness.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from adamjax.convert._ir import ConversionError
from adamjax.convert.layers import _regularizers
from adamjax.convert.layers._base import Layer, option, register
from adamjax.convert.layers.reshaping import data_format

# keras/src/layers/regularization/alpha_dropout.py (SELU's constants).
_ALPHA = 1.6732632423543772
_SCALE = 1.0507009873554805


def _rate(config: Mapping[str, Any], key: str = "rate") -> float:
  value = option(config, key, (int, float), None)
  if value is None or not 0 <= value <= 1:
    raise ConversionError(f"config {key} = {config.get(key)!r} is not a number in [0, 1]")
  return float(value)


def _noise_shape(config: Mapping[str, Any]) -> tuple[int | None, ...] | None:
  value = config.get("noise_shape")
  if value is None:
    return None
  if not isinstance(value, (list, tuple)) or not all(
    d is None or (isinstance(d, int) and not isinstance(d, bool) and d > 0) for d in value
  ):
    raise ConversionError(f"config noise_shape = {value!r} is not positive integers or nulls")
  return tuple(value)


def _key(rngs: Any, layer: str) -> jax.Array:
  if rngs is None:
    raise ValueError(f"{layer} in training mode draws random numbers: pass rngs=nnx.Rngs(...)")
  return rngs.dropout()


def _concrete(noise_shape: tuple[int | None, ...] | None, shape: tuple[int, ...]):
  if noise_shape is None:
    return tuple(shape)
  if len(noise_shape) != len(shape):
    raise ValueError(f"noise_shape {noise_shape} does not have the rank of inputs {shape}")
  return tuple(s if d is None else d for d, s in zip(noise_shape, shape, strict=True))


def dropout(inputs: jax.Array, rate: float, noise_shape, rngs: Any, layer: str) -> jax.Array:
  """``keras/src/backend/jax/random.py`` ``dropout``: kept values scaled by ``1 / (1 - rate)``,
  dropped ones zero, one Bernoulli draw per entry of ``noise_shape`` (broadcast to inputs)."""
  if rate == 1.0:
    return jnp.zeros_like(inputs)
  if rate == 0.0:
    return inputs
  key = _key(rngs, layer)
  keep_prob = 1.0 - rate
  mask = jax.random.bernoulli(key, p=keep_prob, shape=_concrete(noise_shape, inputs.shape))
  mask = jnp.broadcast_to(mask, inputs.shape)
  return jax.lax.select(mask, inputs / keep_prob, jnp.zeros_like(inputs))


@register("Dropout")
class Dropout(Layer):
  """``dropout.py``: Keras's backend dropout in training, the identity otherwise."""

  supports_masking = True

  def __init__(self, config, weights):
    super().__init__(config, weights)
    self.rate = _rate(config)
    self.noise_shape = _noise_shape(config)

  def __call__(self, inputs, *, training=False, mask=None, rngs=None):
    if training and self.rate > 0:
      return dropout(inputs, self.rate, self.noise_shape, rngs, type(self).__name__)
    return inputs


class _SpatialDropout(Dropout):
  """``spatial_dropout.py``: dropout of whole channels (one draw per sample and channel)."""

  spatial: int

  def __init__(self, config, weights):
    super().__init__(config, weights)
    self.data_format = "channels_last" if self.spatial == 1 else data_format(config)

  def __call__(self, inputs, *, training=False, mask=None, rngs=None):
    if inputs.ndim != self.spatial + 2:
      raise ValueError(f"{type(self).__name__} takes rank-{self.spatial + 2} inputs")
    if training and self.rate > 0:
      ones = (1,) * self.spatial
      b = inputs.shape[0]
      if self.data_format == "channels_first":
        noise_shape = (b, inputs.shape[1], *ones)
      else:
        noise_shape = (b, *ones, inputs.shape[-1])
      return dropout(inputs, self.rate, noise_shape, rngs, type(self).__name__)
    return inputs


@register("SpatialDropout1D")
class SpatialDropout1D(_SpatialDropout):
  spatial = 1


@register("SpatialDropout2D")
class SpatialDropout2D(_SpatialDropout):
  spatial = 2


@register("SpatialDropout3D")
class SpatialDropout3D(_SpatialDropout):
  spatial = 3


@register("GaussianNoise")
class GaussianNoise(Layer):
  """``gaussian_noise.py``: ``inputs + normal * stddev`` in training."""

  supports_masking = True

  def __init__(self, config, weights):
    super().__init__(config, weights)
    self.stddev = _rate(config, "stddev")

  def __call__(self, inputs, *, training=False, mask=None, rngs=None):
    if training and self.stddev > 0:
      sample = jax.random.normal(
        _key(rngs, "GaussianNoise"), shape=inputs.shape, dtype=self.compute_dtype
      )
      return inputs + (sample * self.stddev + 0.0)
    return inputs


@register("GaussianDropout")
class GaussianDropout(Layer):
  """``gaussian_dropout.py``: ``inputs * (1 + normal * sqrt(rate / (1 - rate)))`` in
  training."""

  supports_masking = True

  def __init__(self, config, weights):
    super().__init__(config, weights)
    self.rate = _rate(config)

  def __call__(self, inputs, *, training=False, mask=None, rngs=None):
    if training and self.rate > 0:
      if self.rate == 1.0:
        raise ValueError("GaussianDropout with rate=1 has infinite noise (Keras divides by 0)")
      stddev = math.sqrt(self.rate / (1.0 - self.rate))
      sample = jax.random.normal(
        _key(rngs, "GaussianDropout"), shape=inputs.shape, dtype=self.compute_dtype
      )
      return inputs * (sample * stddev + 1.0)
    return inputs


@register("AlphaDropout")
class AlphaDropout(Layer):
  """``alpha_dropout.py``: dropped entries set to SELU's negative saturation value, then an
  affine map that keeps the inputs' mean and variance, in training."""

  supports_masking = True

  def __init__(self, config, weights):
    super().__init__(config, weights)
    self.rate = _rate(config)
    self.noise_shape = _noise_shape(config)

  def __call__(self, inputs, *, training=False, mask=None, rngs=None):
    if training and self.rate > 0:
      noise_shape = _concrete(self.noise_shape, inputs.shape)
      alpha_p = -_ALPHA * _SCALE
      # ops.random.uniform draws in floatx (float32), whatever the layer's dtype.
      uniform = jax.random.uniform(
        _key(rngs, "AlphaDropout"), shape=noise_shape, dtype=jnp.float32, minval=0.0, maxval=1.0
      )
      kept = jnp.greater_equal(uniform, self.rate).astype(inputs.dtype)
      a = ((1 - self.rate) * (1 + self.rate * alpha_p**2)) ** (-0.5)
      b = -a * alpha_p * self.rate
      x = inputs * kept + alpha_p * (1 - kept)
      return a * x + b
    return inputs


@register("ActivityRegularization")
class ActivityRegularization(Layer):
  """``activity_regularization.py``: the identity, whose ``activity_regularizer`` is
  ``L1L2(l1, l2)`` (the graph runner adds its penalty on the outputs to the loss)."""

  supports_masking = True

  def __init__(self, config, weights):
    super().__init__(config, weights)
    l1, l2 = (option(config, k, (int, float), 0.0) for k in ("l1", "l2"))
    self.activity_regularizer = _regularizers.parse(
      {"class_name": "L1L2", "config": {"l1": l1, "l2": l2}},
      _regularizers.REGULARIZERS,
      "regularizer",
    )

  def __call__(self, inputs, *, training=False, mask=None, rngs=None):
    return inputs
