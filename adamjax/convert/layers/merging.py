"""Keras's merging layers: Add, Subtract, Multiply, Average, Maximum, Minimum, Concatenate, Dot
(``keras/src/layers/merging``).

Each takes a list of tensors and, from the graph, a list of their masks (``None`` where a tensor
has none). As in ``base_merge.py``, inputs of different ranks are first expanded at axis 1 up to
the largest rank (not for Concatenate and Dot); Maximum, Minimum and Multiply also let the masks
pick which values are combined (``Merge._apply_merge_op_and_or_mask``, ``Multiply``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from adamjax.convert._ir import ConversionError
from adamjax.convert.layers._base import Layer, option, register


def _as_list(inputs: Any, mask: Any, name: str) -> tuple[list, list]:
  if not isinstance(inputs, list | tuple):
    raise ValueError(f"A {name} layer takes a list of inputs, got {type(inputs).__name__}")
  if mask is None:
    mask = [None] * len(inputs)
  if not isinstance(mask, list | tuple) or len(mask) != len(inputs):
    raise ValueError(f"{name}: the masks must be a list as long as the inputs")
  return list(inputs), list(mask)


def _broadcast_mask(mask: jax.Array, x: jax.Array) -> jax.Array:
  return jnp.broadcast_to(jnp.expand_dims(mask, -1), x.shape)


class _Merge(Layer):
  """``keras/src/layers/merging/base_merge.py``: the shared call and mask rules."""

  supports_masking = True
  reshape_ranks = True  # Merge.build sets _reshape_required when the ranks differ.

  def merge(self, inputs: list[jax.Array], masks: list[Any]) -> jax.Array:
    raise NotImplementedError

  def __call__(self, inputs, *, training=False, mask=None, rngs=None):
    inputs, masks = _as_list(inputs, mask, type(self).__name__)
    if not inputs:
      raise ValueError(f"A {type(self).__name__} layer needs at least one input")
    ranks = [x.ndim for x in inputs]
    if self.reshape_ranks and len(set(ranks)) > 1:
      # Merge.call: expand at axis 1 until all ranks match. Keras reads masks off the tensors
      # it merges, and an expanded tensor is a new one: its mask no longer takes part.
      top = max(ranks)
      expanded, kept = [], []
      for x, m in zip(inputs, masks, strict=True):
        kept.append(m if x.ndim == top else None)
        for _ in range(top - x.ndim):
          x = jnp.expand_dims(x, axis=1)
        expanded.append(x)
      inputs, masks = expanded, kept
    return self.merge(inputs, masks)

  def compute_mask(self, inputs, mask):
    """``Merge.compute_mask``: the OR of the masks, None unless every input has one."""
    if mask is None:
      return None
    inputs, masks = _as_list(inputs, mask, type(self).__name__)
    if any(m is None for m in masks):
      return None
    output = masks[0]
    for m in masks[1:]:
      output = jnp.logical_or(output, m)
    return output


def _merge_op_and_or_mask(op, inputs, masks):
  """``Merge._apply_merge_op_and_or_mask``: masked-out values are taken from the other side."""
  output = output_mask = None
  for x, mask in zip(inputs, masks, strict=True):
    if mask is not None:
      mask = _broadcast_mask(mask, x)
    if output is None:
      output, output_mask = x, mask
      continue
    if mask is not None:
      x = jnp.where(mask, x, output)
    if output_mask is not None:
      output = jnp.where(output_mask, output, x)
    if mask is not None and output_mask is not None:
      output_mask = jnp.logical_or(output_mask, mask)
    else:
      output_mask = None
    output = op(output, x)
  return output


@register("Add")
class Add(_Merge):
  """``keras/src/layers/merging/add.py``: left-to-right sum."""

  def merge(self, inputs, masks):
    output = inputs[0]
    for x in inputs[1:]:
      output = jnp.add(output, x)
    return output


@register("Subtract")
class Subtract(_Merge):
  """``keras/src/layers/merging/subtract.py``: ``inputs[0] - inputs[1]``."""

  def merge(self, inputs, masks):
    if len(inputs) != 2:
      raise ValueError(f"A Subtract layer takes exactly 2 inputs, got {len(inputs)}")
    return jnp.subtract(inputs[0], inputs[1])


@register("Average")
class Average(_Merge):
  """``keras/src/layers/merging/average.py``: left-to-right sum divided by the count."""

  def merge(self, inputs, masks):
    output = inputs[0]
    for x in inputs[1:]:
      output = jnp.add(output, x)
    return output / len(inputs)


@register("Maximum")
class Maximum(_Merge):
  """``keras/src/layers/merging/maximum.py``: elementwise maximum, masks as in base_merge."""

  def merge(self, inputs, masks):
    return _merge_op_and_or_mask(jnp.maximum, inputs, masks)


@register("Minimum")
class Minimum(_Merge):
  """``keras/src/layers/merging/minimum.py``: elementwise minimum, masks as in base_merge."""

  def merge(self, inputs, masks):
    return _merge_op_and_or_mask(jnp.minimum, inputs, masks)


@register("Multiply")
class Multiply(_Merge):
  """``keras/src/layers/merging/multiply.py``: elementwise product; a masked-out value counts as
  1, and where every input has a mask the output is 0 outside their OR."""

  def merge(self, inputs, masks):
    has_output_mask = all(m is not None for m in masks)
    output = output_mask = None
    for x, mask in zip(inputs, masks, strict=True):
      if mask is not None:
        mask = _broadcast_mask(mask, x)
        x = jnp.where(mask, x, jnp.asarray(1, x.dtype))
        if has_output_mask:
          output_mask = mask if output_mask is None else jnp.logical_or(output_mask, mask)
      output = x if output is None else jnp.multiply(output, x)
    if has_output_mask:
      output = jnp.where(output_mask, output, jnp.asarray(0, output.dtype))
    return output


@register("Concatenate")
class Concatenate(_Merge):
  """``keras/src/layers/merging/concatenate.py``: ``concatenate(inputs, axis)``; its mask is the
  masks (all-True where absent, broadcast over the last axis) concatenated, then ``any`` over
  the last axis."""

  reshape_ranks = False

  def __init__(self, config, weights):
    super().__init__(config, weights)
    self.axis = option(config, "axis", int, -1)

  def merge(self, inputs, masks):
    return jnp.concatenate(inputs, axis=self.axis)

  def compute_mask(self, inputs, mask):
    if mask is None:
      return None
    inputs, masks = _as_list(inputs, mask, "Concatenate")
    if all(m is None for m in masks):
      return None
    full = []
    for x, m in zip(inputs, masks, strict=True):
      if m is None:
        full.append(jnp.ones_like(x, dtype=bool))
      elif m.ndim < x.ndim:
        full.append(jnp.logical_or(jnp.expand_dims(m, axis=-1), jnp.zeros_like(x, dtype=bool)))
      else:
        full.append(m)
    return jnp.any(jnp.concatenate(full, axis=self.axis), axis=-1, keepdims=False)


def _l2_normalize(x: jax.Array, axis: int) -> jax.Array:
  # keras/src/ops/nn.py _normalize, order 2: x * min(rsqrt(sum(x**2)), 1 / epsilon).
  square_sum = jnp.sum(jnp.square(x), axis=axis, keepdims=True)
  inv_norm = jax.lax.rsqrt(square_sum)
  inv_norm = jnp.minimum(inv_norm, 1.0 / 1e-7)
  return x * inv_norm


def batch_dot(x: jax.Array, y: jax.Array, axes: Sequence[int]) -> jax.Array:
  """``keras/src/layers/merging/dot.py`` ``batch_dot`` for two non-negative axes (no axis 0)."""
  x_ndim, y_ndim = x.ndim, y.ndim
  a0, a1 = axes
  orig_x_ndim, orig_y_ndim = x_ndim, y_ndim
  if x_ndim == 2:
    x = jnp.expand_dims(x, 1)
    a0 += 1
    x_ndim += 1
  if y_ndim == 2:
    y = jnp.expand_dims(y, 2)
    y_ndim += 1
  if a0 != x_ndim - 1:
    pattern = list(range(x_ndim))
    for i in range(a0, x_ndim - 1):
      pattern[i] = pattern[i + 1]
    pattern[-1] = a0
    x = jnp.transpose(x, pattern)
  if a1 != 1:
    pattern = list(range(y_ndim))
    for i in range(a1, 1, -1):
      pattern[i] = pattern[i - 1]
    pattern[1] = a1
    y = jnp.transpose(y, pattern)
  x_mid_dims = y_trail_dims = None
  if x_ndim > 3:
    x_mid_dims = x.shape[1:-1]
    x = jnp.reshape(x, (x.shape[0], -1, x.shape[-1]))
  if y_ndim > 3:
    y_trail_dims = y.shape[2:]
    y = jnp.reshape(y, (y.shape[0], y.shape[1], -1))
  result = jnp.matmul(x, y)
  output_shape = tuple(result.shape)
  if x_mid_dims is not None:
    output_shape = output_shape[:1] + tuple(x_mid_dims) + output_shape[-1:]
  if y_trail_dims is not None:
    output_shape = output_shape[:-1] + tuple(y_trail_dims)
  if x_mid_dims is not None or y_trail_dims is not None:
    result = jnp.reshape(result, output_shape)
  if orig_x_ndim == 2:
    result = jnp.squeeze(result, 1)
  elif orig_y_ndim == 2:
    result = jnp.squeeze(result, -1)
  return result


@register("Dot")
class Dot(_Merge):
  """``keras/src/layers/merging/dot.py``: ``batch_dot`` over ``axes`` (an int or two ints), of
  the L2-normalized inputs if ``normalize``. Its output carries no mask."""

  reshape_ranks = False

  def __init__(self, config, weights):
    super().__init__(config, weights)
    axes = config.get("axes")
    if isinstance(axes, int) and not isinstance(axes, bool):
      axes = axes
    elif (
      isinstance(axes, list | tuple)
      and len(axes) == 2
      and all(isinstance(a, int) and not isinstance(a, bool) for a in axes)
    ):
      axes = tuple(axes)
    else:
      raise ConversionError(f"config axes = {axes!r} is not an integer or a pair of integers")
    self.axes = axes
    self.normalize = bool(option(config, "normalize", bool, False))

  def merge(self, inputs, masks):
    if len(inputs) != 2:
      raise ValueError(f"A Dot layer takes exactly 2 inputs, got {len(inputs)}")
    x1, x2 = inputs
    pair = (self.axes, self.axes) if isinstance(self.axes, int) else self.axes
    axes = [a % x.ndim if a < 0 else a for a, x in zip(pair, (x1, x2), strict=True)]
    if 0 in axes or x1.ndim < 2 or x2.ndim < 2:
      raise ValueError(f"Dot: cannot take batch_dot over axes {axes} of inputs of rank >= 2")
    if x1.shape[axes[0]] != x2.shape[axes[1]]:
      raise ValueError(f"Dot: axes {axes} of shapes {x1.shape} and {x2.shape} differ in size")
    if self.normalize:
      x1 = _l2_normalize(x1, axes[0])
      x2 = _l2_normalize(x2, axes[1])
    return batch_dot(x1, x2, axes)

  def compute_mask(self, inputs, mask):
    return None
