"""Keras's reshaping layers (``keras/src/layers/reshaping``): Flatten, Reshape, Permute,
RepeatVector, ZeroPadding1D/2D/3D, Cropping1D/2D/3D, UpSampling1D/2D/3D.

They move values without arithmetic (UpSampling2D's interpolating modes aside, which call
``jax.image.resize`` as the Keras JAX backend does), so their outputs are Keras's bit for bit.
None of them sets ``supports_masking`` in Keras, so none passes a mask on.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from adamjax.convert._ir import ConversionError
from adamjax.convert.layers._base import Layer, int_tuple, option, register

_DATA_FORMATS = ("channels_last", "channels_first")
# keras/src/backend/jax/image.py RESIZE_INTERPOLATIONS ("nearest" repeats instead of resizing).
_INTERPOLATIONS = ("bilinear", "nearest", "lanczos3", "lanczos5", "bicubic")


def data_format(config: Mapping[str, Any]) -> str:
  """The layer's ``data_format`` (Keras's default image data format when absent)."""
  value = option(config, "data_format", str, "channels_last")
  if value not in _DATA_FORMATS:
    raise ConversionError(f"config data_format = {value!r} is not one of {_DATA_FORMATS}")
  return value


def _is_int(v: Any) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def _pairs(
  config: Mapping[str, Any], key: str, n: int, default: Any
) -> tuple[tuple[int, int], ...]:
  """Keras's padding/cropping argument as ``n`` ``(before, after)`` pairs: an int (the same on
  every side), for ``n == 1`` one pair, else ``n`` entries that are each an int or a pair."""
  value = config.get(key, default)
  entries = [value] if n == 1 else [value] * n if _is_int(value) else value
  if isinstance(entries, (list, tuple)) and len(entries) == n:
    pairs = []
    for entry in entries:
      if _is_int(entry):
        entry = (entry, entry)
      if not (
        isinstance(entry, (list, tuple)) and len(entry) == 2 and all(_is_int(e) for e in entry)
      ):
        break
      pairs.append(tuple(entry))
    else:
      if all(e >= 0 for pair in pairs for e in pair):
        return tuple(pairs)
  raise ConversionError(f"config {key} = {value!r} is not {n} pairs of non-negative integers")


def _positive(config: Mapping[str, Any], key: str, n: int, default: Any) -> tuple[int, ...]:
  sizes = int_tuple(config, key, n, default)
  if not all(sizes):
    raise ConversionError(f"config {key} = {config.get(key)!r} has a zero entry")
  return sizes


def _spatial_axes(fmt: str, rank: int) -> tuple[int, ...]:
  return tuple(range(2, rank)) if fmt == "channels_first" else tuple(range(1, rank - 1))


def _check_rank(x: jax.Array, rank: int, layer: str) -> None:
  if x.ndim != rank:
    raise ValueError(f"{layer} takes rank-{rank} inputs, got shape {x.shape}")


@register("Flatten")
class Flatten(Layer):
  """``flatten.py``: ``(batch, ...) -> (batch, prod(...))``; channels_first inputs are moved to
  channels_last first, so both formats flatten in the same order."""

  def __init__(self, config, weights):
    super().__init__(config, weights)
    self.data_format = data_format(config)

  def __call__(self, inputs, *, training=False, mask=None, rngs=None):
    rank = inputs.ndim
    if self.data_format == "channels_first" and rank > 1:
      inputs = jnp.transpose(inputs, (0, *range(2, rank), 1))
    return jnp.reshape(inputs, (inputs.shape[0], math.prod(inputs.shape[1:])))


@register("Reshape")
class Reshape(Layer):
  """``reshape.py``: ``(batch, *target_shape)``, one entry of which may be -1 (inferred)."""

  def __init__(self, config, weights):
    super().__init__(config, weights)
    target = config.get("target_shape")
    if (
      not isinstance(target, (list, tuple))
      or not all(_is_int(d) and (d > 0 or d == -1) for d in target)
      or list(target).count(-1) > 1
    ):
      raise ConversionError(
        f"config target_shape = {target!r} is not positive integers with at most one -1"
      )
    self.target_shape = tuple(target)

  def __call__(self, inputs, *, training=False, mask=None, rngs=None):
    size, known = math.prod(inputs.shape[1:]), math.prod(d for d in self.target_shape if d != -1)
    if (size % known if -1 in self.target_shape else size - known) != 0:
      raise ValueError(
        f"Reshape target_shape {self.target_shape} does not fit inputs of shape {inputs.shape}"
      )
    return jnp.reshape(inputs, (inputs.shape[0], *self.target_shape))


@register("Permute")
class Permute(Layer):
  """``permute.py``: transposes the non-batch axes by ``dims`` (1-based)."""

  def __init__(self, config, weights):
    super().__init__(config, weights)
    dims = config.get("dims")
    if not isinstance(dims, (list, tuple)) or sorted(d if _is_int(d) else -1 for d in dims) != list(
      range(1, len(dims) + 1)
    ):
      raise ConversionError(f"config dims = {dims!r} is not a permutation of 1..n")
    self.dims = tuple(dims)

  def __call__(self, inputs, *, training=False, mask=None, rngs=None):
    _check_rank(inputs, len(self.dims) + 1, "Permute")
    return jnp.transpose(inputs, (0, *self.dims))


@register("RepeatVector")
class RepeatVector(Layer):
  """``repeat_vector.py``: ``(batch, features) -> (batch, n, features)``."""

  def __init__(self, config, weights):
    super().__init__(config, weights)
    (self.n,) = _positive(config, "n", 1, None)

  def __call__(self, inputs, *, training=False, mask=None, rngs=None):
    _check_rank(inputs, 2, "RepeatVector")
    reshaped = jnp.reshape(inputs, (inputs.shape[0], 1, inputs.shape[1]))
    return jnp.repeat(reshaped, self.n, axis=1)


class _ZeroPadding(Layer):
  """``zero_padding{1,2,3}d.py``: ``jnp.pad`` with zeros on the spatial axes."""

  spatial: int

  def __init__(self, config, weights):
    super().__init__(config, weights)
    self.data_format = data_format(config)
    self.padding = _pairs(config, "padding", self.spatial, 1)

  def __call__(self, inputs, *, training=False, mask=None, rngs=None):
    _check_rank(inputs, self.spatial + 2, type(self).__name__)
    if self.data_format == "channels_first":
      widths = ((0, 0), (0, 0), *self.padding)
    else:
      widths = ((0, 0), *self.padding, (0, 0))
    return jnp.pad(inputs, widths)


@register("ZeroPadding1D")
class ZeroPadding1D(_ZeroPadding):
  spatial = 1


@register("ZeroPadding2D")
class ZeroPadding2D(_ZeroPadding):
  spatial = 2


@register("ZeroPadding3D")
class ZeroPadding3D(_ZeroPadding):
  spatial = 3


class _Cropping(Layer):
  """``cropping{1,2,3}d.py``: slices ``(before, after)`` off each spatial axis."""

  spatial: int
  default: Any

  def __init__(self, config, weights):
    super().__init__(config, weights)
    # Cropping1D has no data_format: its axis 1 is always the one cropped.
    self.data_format = "channels_last" if self.spatial == 1 else data_format(config)
    self.cropping = _pairs(config, "cropping", self.spatial, self.default)

  def __call__(self, inputs, *, training=False, mask=None, rngs=None):
    _check_rank(inputs, self.spatial + 2, type(self).__name__)
    index = [slice(None)] * inputs.ndim
    for axis, (before, after) in zip(
      _spatial_axes(self.data_format, inputs.ndim), self.cropping, strict=True
    ):
      if before + after >= inputs.shape[axis]:
        raise ValueError(
          f"{type(self).__name__} cropping {self.cropping} is not smaller than the input's "
          f"spatial size (shape {inputs.shape})"
        )
      index[axis] = slice(before, inputs.shape[axis] - after)
    return inputs[tuple(index)]


@register("Cropping1D")
class Cropping1D(_Cropping):
  spatial, default = 1, (1, 1)


@register("Cropping2D")
class Cropping2D(_Cropping):
  spatial, default = 2, 0


@register("Cropping3D")
class Cropping3D(_Cropping):
  spatial, default = 3, 1


@register("UpSampling1D")
class UpSampling1D(Layer):
  """``up_sampling1d.py``: repeats each step ``size`` times along axis 1."""

  def __init__(self, config, weights):
    super().__init__(config, weights)
    (self.size,) = _positive(config, "size", 1, 2)

  def __call__(self, inputs, *, training=False, mask=None, rngs=None):
    _check_rank(inputs, 3, "UpSampling1D")
    return jnp.repeat(inputs, self.size, axis=1)


@register("UpSampling2D")
class UpSampling2D(Layer):
  """``up_sampling2d.py``: ``nearest`` repeats rows then columns; the other interpolations
  resize a channels_last view with ``jax.image.resize`` (no antialiasing), as the Keras JAX
  backend's ``image.resize`` does."""

  def __init__(self, config, weights):
    super().__init__(config, weights)
    self.data_format = data_format(config)
    self.size = _positive(config, "size", 2, 2)
    interpolation = option(config, "interpolation", str, "nearest").lower()
    if interpolation not in _INTERPOLATIONS:
      raise ConversionError(
        f"config interpolation = {interpolation!r} is not one of {_INTERPOLATIONS}"
      )
    self.interpolation = interpolation

  def __call__(self, inputs, *, training=False, mask=None, rngs=None):
    _check_rank(inputs, 4, "UpSampling2D")
    x = inputs
    if self.data_format == "channels_first":
      x = jnp.transpose(x, (0, 2, 3, 1))
    if self.interpolation == "nearest":
      x = jnp.repeat(x, self.size[0], axis=1)
      x = jnp.repeat(x, self.size[1], axis=2)
    else:
      b, h, w, c = x.shape
      shape = (b, h * self.size[0], w * self.size[1], c)
      x = jax.image.resize(x, shape, method=self.interpolation, antialias=False)
    if self.data_format == "channels_first":
      x = jnp.transpose(x, (0, 3, 1, 2))
    return x


@register("UpSampling3D")
class UpSampling3D(Layer):
  """``up_sampling3d.py``: repeats the three spatial axes in turn."""

  def __init__(self, config, weights):
    super().__init__(config, weights)
    self.data_format = data_format(config)
    self.size = _positive(config, "size", 3, 2)

  def __call__(self, inputs, *, training=False, mask=None, rngs=None):
    _check_rank(inputs, 5, "UpSampling3D")
    for axis, size in zip(_spatial_axes(self.data_format, 5), self.size, strict=True):
      inputs = jnp.repeat(inputs, size, axis=axis)
    return inputs
