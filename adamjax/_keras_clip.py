"""Keras's gradient clipping (`clipnorm`, `global_clipnorm`, `clipvalue`) as transformations.

Keras's formulas differ from optax's in the last bits: its global clip multiplies by
`clip * min(1/norm, 1/clip)`, which below the threshold is not always exactly 1, where
`optax.clip_by_global_norm` selects the unclipped gradient. These follow Keras.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from adamjax import _common, _xla_exact


class KerasClipState(NamedTuple):
  """State of the norm clips: a step counter, which keeps their sums exact under jit."""

  step: jax.Array


def _init(params):
  del params
  return KerasClipState(step=jnp.zeros([], jnp.int32))


def _sum_of_squares(g: jax.Array, r: Any, **kwargs: Any) -> jax.Array:
  # Keras squares, then sums; under jit XLA would fold each square into the running sum as an
  # FMA, so the square is rounded first unless fusion is allowed.
  return jnp.sum(r(jnp.square(g)), **kwargs)


def keras_clip_by_norm(
  clipnorm: Any, *, fused_multiply_add: bool = False
) -> optax.GradientTransformation:
  r"""Clips each gradient tensor to L2 norm `clipnorm`, as Keras's `clipnorm` option.

  .. math:: g \leftarrow (g \cdot c) / \max(\lVert g \rVert_2, c)

  with Keras's guard for an all-zero tensor (its norm is taken as 0 without a square root).

  Args:
    clipnorm: The largest L2 norm of each tensor; must be > 0.
    fused_multiply_add: Let XLA fuse the squares into the sum under jit (see
      :func:`adamjax.keras_adam`).

  Returns:
    An `optax.GradientTransformation` with state :class:`KerasClipState`.

  References:
    `keras/src/optimizers/base_optimizer.py` (`_clip_by_norm`); `tf.clip_by_norm`.
  """
  _common.check_hyperparameter("clipnorm", clipnorm, low=0.0)

  def update_fn(updates, state, params=None):
    del params
    r = _xla_exact.make_no_fma(state.step, not fused_multiply_add)

    def clip(g):
      l2sum = _sum_of_squares(g, r, keepdims=True)
      positive = l2sum > 0
      l2norm = jnp.where(
        positive, jnp.sqrt(jnp.where(positive, l2sum, jnp.ones_like(l2sum))), l2sum
      )
      return (g * clipnorm) / jnp.maximum(l2norm, clipnorm)

    return _common.tree_map_leaves(clip, updates), KerasClipState(
      _common.safe_increment(state.step)
    )

  return optax.GradientTransformation(_init, update_fn)


def keras_clip_by_global_norm(
  global_clipnorm: Any, *, fused_multiply_add: bool = False
) -> optax.GradientTransformation:
  r"""Scales all gradients so their joint L2 norm is at most `global_clipnorm`, as Keras.

  .. math::
    n = \sqrt{\textstyle\sum_i \sum g_i^2},\quad
    g_i \leftarrow g_i \cdot \bigl(c \cdot \min(1/n, 1/c) + (n - n)\bigr)

  The `(n - n)` term makes every gradient NaN when the norm is not finite, as in Keras. Leaf
  norms are summed in tree order, the order Keras sums its variables when the tree's order is
  the model's.

  Args:
    global_clipnorm: The largest global norm; must be > 0.
    fused_multiply_add: Let XLA fuse the squares into the sums under jit.

  Returns:
    An `optax.GradientTransformation` with state :class:`KerasClipState`.

  References:
    `keras/src/optimizers/base_optimizer.py` (`clip_by_global_norm`).
  """
  _common.check_hyperparameter("global_clipnorm", global_clipnorm, low=0.0)

  def update_fn(updates, state, params=None):
    del params
    r = _xla_exact.make_no_fma(state.step, not fused_multiply_add)
    leaves = [g for g in jax.tree.leaves(updates) if g is not None]
    norm = jnp.sqrt(jnp.sum(jnp.stack([_sum_of_squares(g, r) for g in leaves])))
    scale = global_clipnorm * jnp.minimum(1.0 / norm, 1.0 / global_clipnorm) + (norm - norm)
    return _common.tree_map_leaves(lambda g: g * scale, updates), KerasClipState(
      _common.safe_increment(state.step)
    )

  return optax.GradientTransformation(_init, update_fn)


def keras_clip_by_value(clipvalue: Any) -> optax.GradientTransformation:
  """Clips every gradient element to `[-clipvalue, clipvalue]`, as Keras's `clipvalue`.

  The same as `optax.clip(clipvalue)`; provided so a Keras configuration maps one to one.

  Args:
    clipvalue: The largest magnitude of an element; must be > 0.

  Returns:
    A stateless `optax.GradientTransformation`.
  """
  _common.check_hyperparameter("clipvalue", clipvalue, low=0.0)

  def update_fn(updates, state, params=None):
    del params
    return _common.tree_map_leaves(lambda g: jnp.clip(g, -clipvalue, clipvalue), updates), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)
