"""Keras's gradient accumulation (`gradient_accumulation_steps`) as a wrapper transformation."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from adamjax import _common, _xla_exact


class KerasAccumulationState(NamedTuple):
  """State of :func:`keras_gradient_accumulation`.

  Attributes:
    mini_step: int32 calls so far (Keras's raw `_iterations`).
    acc: The sum of the gradients since the last update (Keras's `gradient_accumulator`).
    inner_state: The wrapped transformation's state, advanced once per `steps` calls.
  """

  mini_step: jax.Array
  acc: optax.Updates
  inner_state: Any


def keras_gradient_accumulation(
  inner: optax.GradientTransformation, steps: int, *, fused_multiply_add: bool = False
) -> optax.GradientTransformation:
  r"""Sums `steps` gradients, then runs `inner` on their mean, as Keras accumulates.

  On calls that complete a group of `steps` the gradient passed to `inner` is
  :math:`(g + \sum_{\text{earlier}} g) / \text{steps}` (a sum, then one division: Keras's
  rounding, where `optax.MultiSteps` keeps a running mean); on the others the update is zero
  and `inner`'s state is left as it was. Put clipping, weight decay and the optimizer inside.

  Args:
    inner: The transformation to run on the accumulated gradient.
    steps: Keras's `gradient_accumulation_steps`, an integer >= 2.
    fused_multiply_add: If False (default), divide the sum as TensorFlow does. If True, let
      XLA multiply by `1 / steps` instead, as it does for Keras on the JAX backend (the same
      result when `steps` is a power of two).

  Returns:
    An `optax.GradientTransformation`.

  References:
    `keras/src/backend/jax/optimizer.py` (`_backend_apply_gradients`).
  """
  steps = _common.check_static_int("gradient_accumulation_steps", steps, low=2, allow_none=False)

  def init_fn(params):
    return KerasAccumulationState(
      mini_step=jnp.zeros([], jnp.int32),
      acc=optax.tree.zeros_like(params),
      inner_state=inner.init(params),
    )

  def update_fn(updates, state, params=None):
    _common.check_updates_match(updates, state.acc, "the gradient accumulator")
    is_update_step = (state.mini_step + 1) % steps == 0
    # The same control flow as Keras's JAX backend: `lax.cond` picks the gradient, the inner
    # update runs on it, and `lax.cond` keeps or drops the result. The gradient arrives rounded
    # (an unscale upstream must not fuse into the sum as an FMA).
    r = _xla_exact.make_no_fma(state.mini_step)
    summed = _common.tree_map_leaves(lambda g, a: r(g) + a.astype(g.dtype), updates, state.acc)
    divide = (
      (lambda s: s / steps)
      if fused_multiply_add
      else (lambda s: _xla_exact.no_reciprocal_divide(s, steps))
    )
    grads = jax.lax.cond(
      is_update_step, lambda: _common.tree_map_leaves(divide, summed), lambda: updates
    )
    new_updates, new_inner = inner.update(grads, state.inner_state, params)
    new_updates, inner_state = jax.lax.cond(
      is_update_step,
      lambda: (new_updates, new_inner),
      lambda: (_common.tree_map_leaves(jnp.zeros_like, new_updates), state.inner_state),
    )
    acc = jax.lax.cond(
      is_update_step,
      lambda: jax.tree.map(jnp.zeros_like, state.acc),
      lambda: _common.tree_map_leaves(lambda s, a: s.astype(a.dtype), summed, state.acc),
    )
    return new_updates, KerasAccumulationState(
      mini_step=_common.safe_increment(state.mini_step), acc=acc, inner_state=inner_state
    )

  return optax.GradientTransformation(init_fn, update_fn)
