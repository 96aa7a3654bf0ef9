"""Keras's pooling layers (``keras/src/layers/pooling``): Max/AveragePooling1D/2D/3D and the
global ones, with ``keepdims`` and ``data_format``.

Windowed pooling is ``max_pool``/``average_pool`` of ``keras/src/backend/jax/nn.py`` (one
``lax.reduce_window``; ``same`` averages divide by a second reduce_window's window counts), and
global pooling is ``ops.max``/``ops.mean`` of ``keras/src/backend/jax/numpy.py`` (the mean
accumulates in at least float32, then casts back), so the outputs are bit-identical to Keras on
the JAX backend.
"""

from __future__ import annotations

import math
from typing import ClassVar

import jax
import jax.numpy as jnp

from adamjax.convert.layers._base import Layer, option, register
from adamjax.convert.layers.convolutional import data_format_option, padding_option, positive_tuple


def _window(sizes: tuple[int, ...], data_format: str) -> tuple[int, ...]:
  """``_convert_to_spatial_operand``: a window over the spatial axes only."""
  return (1,) + sizes + (1,) if data_format == "channels_last" else (1, 1) + sizes


def max_pool(x, pool_size, strides, padding, data_format):
  """Keras JAX ``nn.max_pool``."""
  window = _window(pool_size, data_format)
  strides = _window(strides, data_format)
  return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, window, strides, padding.upper())


def average_pool(x, pool_size, strides, padding, data_format):
  """Keras JAX ``nn.average_pool``: the window sum over the window size (valid) or over the
  number of real (unpadded) entries in each window (same)."""
  window = _window(pool_size, data_format)
  strides = _window(strides, data_format)
  pooled = jax.lax.reduce_window(x, 0.0, jax.lax.add, window, strides, padding.upper())
  if padding == "valid":
    return pooled / math.prod(window)
  shape = [(a if b != 1 else 1) for a, b in zip(x.shape, window, strict=True)]
  counts = jax.lax.reduce_window(
    jnp.ones(shape, x.dtype), 0.0, jax.lax.add, window, strides, padding.upper()
  )
  return pooled / counts


def mean(x, axis, keepdims):
  """Keras JAX ``numpy.mean``: accumulated in ``result_type(x, float32)``, cast back."""
  out = jnp.mean(x, axis=axis, keepdims=keepdims, dtype=jnp.promote_types(x.dtype, jnp.float32))
  return out.astype(x.dtype)


class _Pooling(Layer):
  """``keras/src/layers/pooling/base_pooling.py``: strides default to the pool size."""

  rank: ClassVar[int]
  pool: ClassVar = staticmethod(max_pool)

  def __init__(self, config, weights):
    super().__init__(config, weights)
    self.pool_size = positive_tuple(config, "pool_size", self.rank, 2)
    self.strides = self.pool_size
    if config.get("strides") is not None:
      self.strides = positive_tuple(config, "strides", self.rank)
    self.padding = padding_option(config, ("valid", "same"))
    self.data_format = data_format_option(config)

  def __call__(self, inputs, *, training=False, mask=None, rngs=None):
    return self.pool(inputs, self.pool_size, self.strides, self.padding, self.data_format)


@register("MaxPooling1D")
class MaxPooling1D(_Pooling):
  """``keras/src/layers/pooling/max_pooling1d.py``."""

  rank = 1


@register("MaxPooling2D")
class MaxPooling2D(_Pooling):
  """``keras/src/layers/pooling/max_pooling2d.py``."""

  rank = 2


@register("MaxPooling3D")
class MaxPooling3D(_Pooling):
  """``keras/src/layers/pooling/max_pooling3d.py``."""

  rank = 3


@register("AveragePooling1D")
class AveragePooling1D(_Pooling):
  """``keras/src/layers/pooling/average_pooling1d.py``."""

  rank = 1
  pool = staticmethod(average_pool)


@register("AveragePooling2D")
class AveragePooling2D(_Pooling):
  """``keras/src/layers/pooling/average_pooling2d.py``."""

  rank = 2
  pool = staticmethod(average_pool)


@register("AveragePooling3D")
class AveragePooling3D(_Pooling):
  """``keras/src/layers/pooling/average_pooling3d.py``."""

  rank = 3
  pool = staticmethod(average_pool)


class _GlobalPooling(Layer):
  """``keras/src/layers/pooling/base_global_pooling.py``: a reduction over the spatial axes."""

  rank: ClassVar[int]

  def __init__(self, config, weights):
    super().__init__(config, weights)
    self.data_format = data_format_option(config)
    self.keepdims = option(config, "keepdims", bool, False)

  @property
  def axes(self) -> tuple[int, ...]:
    first = 1 if self.data_format == "channels_last" else 2
    return tuple(range(first, first + self.rank))


class _GlobalMax(_GlobalPooling):
  def __call__(self, inputs, *, training=False, mask=None, rngs=None):
    return jnp.max(inputs, axis=self.axes, keepdims=self.keepdims)


class _GlobalAverage(_GlobalPooling):
  def __call__(self, inputs, *, training=False, mask=None, rngs=None):
    return mean(inputs, self.axes, self.keepdims)


@register("GlobalMaxPooling1D")
class GlobalMaxPooling1D(_GlobalMax):
  """``keras/src/layers/pooling/global_max_pooling1d.py``."""

  rank = 1


@register("GlobalMaxPooling2D")
class GlobalMaxPooling2D(_GlobalMax):
  """``keras/src/layers/pooling/global_max_pooling2d.py``."""

  rank = 2


@register("GlobalMaxPooling3D")
class GlobalMaxPooling3D(_GlobalMax):
  """``keras/src/layers/pooling/global_max_pooling3d.py``."""

  rank = 3


@register("GlobalAveragePooling1D")
class GlobalAveragePooling1D(_GlobalAverage):
  """``keras/src/layers/pooling/global_average_pooling1d.py``: with a mask, the sum of the
  unmasked steps over their count; the output carries no mask."""

  rank = 1
  supports_masking = True

  def __call__(self, inputs, *, training=False, mask=None, rngs=None):
    if mask is None:
      return super().__call__(inputs)
    steps = self.axes[0]
    mask = jnp.expand_dims(mask, 2 if self.data_format == "channels_last" else 1).astype(bool)
    inputs = jnp.where(mask, inputs, 0)
    float_mask = mask.astype(inputs.dtype)
    return jnp.sum(inputs, axis=steps, keepdims=self.keepdims) / jnp.sum(
      float_mask, axis=steps, keepdims=self.keepdims
    )

  def compute_mask(self, inputs, mask):
    return None


@register("GlobalAveragePooling2D")
class GlobalAveragePooling2D(_GlobalAverage):
  """``keras/src/layers/pooling/global_average_pooling2d.py``."""

  rank = 2


@register("GlobalAveragePooling3D")
class GlobalAveragePooling3D(_GlobalAverage):
  """``keras/src/layers/pooling/global_average_pooling3d.py``."""

  rank = 3
