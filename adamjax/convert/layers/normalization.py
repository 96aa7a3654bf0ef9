"""Keras's normalization layers (``keras/src/layers/normalization``): BatchNormalization,
LayerNormalization, GroupNormalization, UnitNormalization.

Each computes in at least float32 (``result_type(inputs, float32)``) and returns the layer's
compute dtype, with the operations of ``keras/src/backend/jax/nn.py`` (``moments``,
``batch_normalization``) and ``keras/src/ops/nn.py`` (``_layer_normalization``, ``_normalize``)
in their order, so that jitted outputs are Keras's bit for bit. All four pass a mask on unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from adamjax.convert._ir import ConversionError
from adamjax.convert.layers._base import Layer, option, register

_KERAS_EPSILON = 1e-7  # keras.backend.epsilon(), used by BatchNormalization's masked moments


def _is_int(v: Any) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def _axes(config: Mapping[str, Any], key: str = "axis") -> int | tuple[int, ...]:
  value = config.get(key, -1)
  if _is_int(value):
    return value
  if isinstance(value, Sequence) and value and all(_is_int(a) for a in value):
    return tuple(value)
  raise ConversionError(f"config {key} = {value!r} is not an integer or a list of integers")


def _number(config: Mapping[str, Any], key: str, default: float) -> float:
  value = option(config, key, (int, float), default)
  if value != value:
    raise ConversionError(f"config {key} = {value!r} is not a number")
  return float(value)


def _flag(config: Mapping[str, Any], key: str, default: bool) -> bool:
  return option(config, key, bool, default)


def _moments(x: jax.Array, axes: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
  """``keras/src/backend/jax/nn.py`` ``moments(x, axes, keepdims=True)`` for float32 or wider
  ``x`` (its float16 detour never applies: every caller has cast to float32 already)."""
  return jnp.mean(x, axes, keepdims=True), jnp.var(x, axis=axes, keepdims=True)


@register("BatchNormalization")
class BatchNormalization(Layer):
  """``batch_normalization.py``: ``(x - mean) * rsqrt(var + epsilon) * gamma + beta`` along
  ``axis``, as ``x * inv + (beta - mean * inv)``.

  In training (and when the layer is ``trainable``) it normalizes with the batch's statistics
  (over the unmasked positions when a mask is given) and updates its ``mean``/``var`` BatchStat
  variables in place as Keras updates ``moving_mean``/``moving_variance``:
  ``moving * momentum + batch * (1 - momentum)``. Only ``renorm=False`` and
  ``synchronized=False`` are built (Keras's JAX backend refuses ``synchronized`` itself).
  """

  supports_masking = True
  flax_names = {"gamma": "scale", "beta": "bias", "moving_mean": "mean", "moving_variance": "var"}

  @classmethod
  def variables(cls, config):
    for key in ("renorm", "synchronized"):
      if _flag(config, key, False):
        raise ConversionError(f"BatchNormalization {key}=True is not supported")
    names = ("gamma",) if _flag(config, "scale", True) else ()
    names += ("beta",) if _flag(config, "center", True) else ()
    return (*names, "moving_mean", "moving_variance")

  @classmethod
  def non_trainable(cls, config):
    return frozenset({"moving_mean", "moving_variance"})

  def __init__(self, config, weights):
    super().__init__(config, weights)
    axis = config.get("axis", -1)
    if isinstance(axis, (list, tuple)) and len(axis) == 1:  # tf-keras writes [axis]
      axis = axis[0]
    if not _is_int(axis):
      raise ConversionError(f"config axis = {axis!r} is not an integer")
    self.axis = axis
    self.momentum = _number(config, "momentum", 0.99)
    self.epsilon = _number(config, "epsilon", 1e-3)
    self.use_scale = _flag(config, "scale", True)
    self.use_center = _flag(config, "center", True)
    self.trainable = _flag(config, "trainable", True)

  def _batch_moments(self, x, mask, reduction_axes):
    if mask is None:
      mean, variance = _moments(x, reduction_axes)
      return jnp.squeeze(mean, reduction_axes), jnp.squeeze(variance, reduction_axes)
    # Keras's masked moments: sums over the unmasked positions, divided by (count + 1e-7).
    mask = jnp.broadcast_to(jnp.expand_dims(mask, axis=-1), x.shape).astype(bool)
    masked_sum = jnp.sum(jnp.where(mask, x, 0), reduction_axes, keepdims=True)
    weights = jnp.sum(mask.astype(x.dtype), reduction_axes, keepdims=True)
    mean = masked_sum / (weights + _KERAS_EPSILON)
    squared = jnp.square(jnp.where(mask, x - mean, 0))
    variance = jnp.sum(squared, reduction_axes, keepdims=True) / (weights + _KERAS_EPSILON)
    return jnp.squeeze(mean, reduction_axes), jnp.squeeze(variance, reduction_axes)

  def __call__(self, inputs, *, training=False, mask=None, rngs=None):
    if mask is not None and mask.ndim != inputs.ndim - 1:
      raise ValueError(
        f"BatchNormalization's mask must have one dimension less than its inputs, got "
        f"mask.shape={mask.shape}, inputs.shape={inputs.shape}"
      )
    dtype = jnp.result_type(inputs.dtype, jnp.float32)
    x = inputs.astype(dtype)
    mean, variance = self.mean[...].astype(dtype), self.var[...].astype(dtype)
    if training and self.trainable:
      reduction_axes = list(range(x.ndim))
      del reduction_axes[self.axis]
      moving_mean, moving_variance = mean, variance
      mean, variance = self._batch_moments(x, mask, tuple(reduction_axes))
      new_mean = moving_mean * self.momentum + mean * (1.0 - self.momentum)
      new_variance = moving_variance * self.momentum + variance * (1.0 - self.momentum)
      self.mean[...] = new_mean.astype(self.mean[...].dtype)
      self.var[...] = new_variance.astype(self.var[...].dtype)
    # keras/src/backend/jax/nn.py batch_normalization
    shape = [1] * x.ndim
    shape[self.axis] = mean.shape[0]
    inv = jax.lax.rsqrt(jnp.reshape(variance, shape) + self.epsilon)
    if self.use_scale:
      inv = inv * jnp.reshape(self.scale[...].astype(dtype), shape)
    res = -jnp.reshape(mean, shape) * inv
    if self.use_center:
      res = res + jnp.reshape(self.bias[...].astype(dtype), shape)
    return jnp.add(x * inv, res).astype(self.compute_dtype)


@register("LayerNormalization")
class LayerNormalization(Layer):
  """``layer_normalization.py`` through ``keras/src/ops/nn.py`` ``_layer_normalization``:
  moments over ``axis`` (sorted), ``x * inv + (beta - mean * inv)`` with
  ``inv = rsqrt(var + epsilon) * gamma``; with the deprecated ``rms_scaling`` (Keras scales by
  the variance, not the mean square) ``x * rsqrt(var + epsilon) * gamma``."""

  supports_masking = True
  flax_names = {"gamma": "scale", "beta": "bias"}

  @classmethod
  def variables(cls, config):
    rms = _flag(config, "rms_scaling", False)
    names = ("gamma",) if _flag(config, "scale", True) or rms else ()
    return names + (("beta",) if _flag(config, "center", True) and not rms else ())

  def __init__(self, config, weights):
    super().__init__(config, weights)
    axis = _axes(config)
    self.axis = tuple(sorted(axis)) if isinstance(axis, tuple) else (axis,)
    self.epsilon = _number(config, "epsilon", 1e-3)
    self.rms_scaling = _flag(config, "rms_scaling", False)
    self.has_gamma = _flag(config, "scale", True) or self.rms_scaling
    self.has_beta = _flag(config, "center", True) and not self.rms_scaling

  def __call__(self, inputs, *, training=False, mask=None, rngs=None):
    original = inputs.dtype
    x = inputs.astype(jnp.result_type(inputs.dtype, jnp.float32))
    axis = self.axis
    broadcast_shape = [1] * x.ndim
    for dim in axis:
      broadcast_shape[dim] = x.shape[dim]

    # Keras broadcasts gamma/beta implicitly when axis == [ndim - 1]; reshaping them is the
    # same broadcast, spelled out for strict rank promotion.
    def broadcast(v):
      v = v.astype(x.dtype)
      return v if v.ndim == x.ndim else jnp.reshape(v, broadcast_shape)

    gamma = broadcast(self.scale[...]) if self.has_gamma else None
    if self.rms_scaling:
      # keras/src/backend/jax/numpy.py var: jnp.var with a float32-or-wider dtype.
      variance = jnp.var(x, axis=axis, keepdims=True, dtype=jnp.result_type(x.dtype, jnp.float32))
      outputs = x * jax.lax.rsqrt(variance + self.epsilon)
      if gamma is not None:
        outputs = outputs * gamma
    else:
      mean, variance = _moments(x, axis)
      inv = jax.lax.rsqrt(variance + self.epsilon)
      if gamma is not None:
        inv = inv * gamma
      res = -mean * inv
      if self.has_beta:
        res = res + broadcast(self.bias[...])
      outputs = x * inv + res
    return outputs.astype(original).astype(self.compute_dtype)


@register("GroupNormalization")
class GroupNormalization(Layer):
  """``group_normalization.py``: the channel axis split into ``groups`` (``-1``: one per
  channel), moments over each group's channels and the other non-batch axes, then
  ``x * inv + (beta - mean * inv)`` with ``inv = rsqrt(var + epsilon) * gamma``."""

  supports_masking = True

  @classmethod
  def variables(cls, config):
    names = ("gamma",) if _flag(config, "scale", True) else ()
    return names + (("beta",) if _flag(config, "center", True) else ())

  def __init__(self, config, weights):
    super().__init__(config, weights)
    groups = config.get("groups", 32)
    if not _is_int(groups) or (groups <= 0 and groups != -1):
      raise ConversionError(f"config groups = {groups!r} is not a positive integer or -1")
    axis = _axes(config)
    if not _is_int(axis):
      raise ConversionError(f"config axis = {axis!r} is not an integer")
    self.groups, self.axis = groups, axis
    self.epsilon = _number(config, "epsilon", 1e-3)
    self.use_scale = _flag(config, "scale", True)
    self.use_center = _flag(config, "center", True)

  def __call__(self, inputs, *, training=False, mask=None, rngs=None):
    dim = inputs.shape[self.axis]
    groups = dim if self.groups == -1 else self.groups
    if dim % groups != 0 or dim < groups:
      raise ValueError(f"GroupNormalization: {groups} groups do not divide {dim} channels")
    # _reshape_into_groups: (..., channels, ...) -> (..., groups, channels // groups, ...).
    group_shape = list(inputs.shape)
    group_shape[0] = -1
    group_shape[self.axis] = dim // groups
    group_shape.insert(self.axis, groups)
    reshaped = jnp.reshape(inputs, group_shape)
    # _apply_normalization
    x = reshaped.astype(jnp.result_type(reshaped.dtype, jnp.float32))
    reduction_axes = list(range(1, x.ndim))
    reduction_axes.pop(-2 if self.axis == -1 else self.axis - 1)
    broadcast_shape = [1] * inputs.ndim
    broadcast_shape[self.axis] = dim // groups
    broadcast_shape.insert(self.axis, groups)
    mean, variance = _moments(x, tuple(reduction_axes))
    inv = jax.lax.rsqrt(variance + self.epsilon)
    if self.use_scale:
      inv = inv * jnp.reshape(self.gamma[...], broadcast_shape).astype(x.dtype)
    res = -mean * inv
    if self.use_center:
      res = res + jnp.reshape(self.beta[...], broadcast_shape).astype(x.dtype)
    normalized = (x * inv + res).astype(inputs.dtype)
    return jnp.reshape(normalized, inputs.shape).astype(self.compute_dtype)


@register("UnitNormalization")
class UnitNormalization(Layer):
  """``unit_normalization.py`` through ``keras/src/ops/nn.py`` ``_normalize`` (order 2):
  ``x * min(rsqrt(sum(x**2, axis)), 1 / 1e-12)``."""

  supports_masking = True

  def __init__(self, config, weights):
    super().__init__(config, weights)
    self.axis = _axes(config)

  def __call__(self, inputs, *, training=False, mask=None, rngs=None):
    square_sum = jnp.sum(jnp.square(inputs), axis=self.axis, keepdims=True)
    inv_norm = jnp.minimum(jax.lax.rsqrt(square_sum), 1.0 / 1e-12)
    return inputs * inv_norm
