"""Loss scaling: Keras's fixed `loss_scale_factor` and its dynamic `LossScaleOptimizer`."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from adamjax import _common, _xla_exact


def unscale_gradients(
  loss_scale_factor: Any, *, fused_multiply_add: bool = False
) -> optax.GradientTransformation:
  """Divides the gradients by a fixed loss scale, as Keras's `loss_scale_factor` option.

  Multiply the loss by the same factor before differentiating (Keras's `scale_loss`).

  Args:
    loss_scale_factor: The factor the loss was multiplied by; must be > 0.
    fused_multiply_add: If False (default), divide as TensorFlow does. If True, let XLA
      multiply by the reciprocal instead, as it does for Keras on the JAX backend (the same
      result when the factor is a power of two).

  Returns:
    A stateless `optax.GradientTransformation`.
  """
  _common.check_hyperparameter("loss_scale_factor", loss_scale_factor, low=0.0)
  if not isinstance(loss_scale_factor, jax.core.Tracer) and not _common.given(loss_scale_factor):
    raise ValueError(f"loss_scale_factor must be > 0, got {loss_scale_factor!r}")

  def update_fn(updates, state, params=None):
    del params
    divide = (
      (lambda g: g / loss_scale_factor)
      if fused_multiply_add
      else (lambda g: _xla_exact.no_reciprocal_divide(g, loss_scale_factor))
    )
    return _common.tree_map_leaves(divide, updates), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


class DynamicLossScaleState(NamedTuple):
  """State of :func:`dynamic_loss_scale` (Keras's `dynamic_scale` and `step_counter`)."""

  loss_scale: jax.Array
  step_counter: jax.Array
  inner_state: Any


def dynamic_loss_scale(
  inner: optax.GradientTransformation,
  initial_scale: float = 2.0**15,
  dynamic_growth_steps: int = 2000,
) -> optax.GradientTransformation:
  """Dynamic loss scaling around any transformation, as `keras.optimizers.LossScaleOptimizer`.

  Scale the loss with :func:`scale_loss` before differentiating. Each update then checks the
  gradients: if all are finite they are divided by the current scale and passed to `inner`,
  and after `dynamic_growth_steps` finite steps in a row the scale doubles; otherwise the
  step is skipped (zero update, `inner`'s state untouched) and the scale halves.

  Args:
    inner: The transformation to protect, for example :func:`adamjax.keras_adam`.
    initial_scale: The starting loss scale (Keras: 2**15).
    dynamic_growth_steps: Finite steps before the scale doubles (Keras: 2000).

  Returns:
    An `optax.GradientTransformation` with state :class:`DynamicLossScaleState`.

  Example:
    >>> import adamjax, jax, jax.numpy as jnp, optax
    >>> tx = adamjax.dynamic_loss_scale(adamjax.keras_adam(), initial_scale=8.0)
    >>> params = jnp.array([1.0, 2.0])
    >>> state = tx.init(params)
    >>> grads = jax.grad(lambda p: adamjax.scale_loss(jnp.sum(p**2), state))(params)
    >>> updates, state = tx.update(grads, state, params)
    >>> updates, state = tx.update(grads * jnp.inf, state, params)  # overflow: skipped
    >>> print(updates, state.loss_scale)
    [0. 0.] 4.0

  References:
    `keras/src/optimizers/loss_scale_optimizer.py`.
  """
  _common.check_hyperparameter("initial_scale", initial_scale, low=0.0)
  dynamic_growth_steps = _common.check_static_int(
    "dynamic_growth_steps", dynamic_growth_steps, low=1, allow_none=False
  )

  def init_fn(params):
    return DynamicLossScaleState(
      loss_scale=jnp.asarray(initial_scale, jnp.float32),
      step_counter=jnp.zeros([], jnp.int32),
      inner_state=inner.init(params),
    )

  def update_fn(updates, state, params=None):
    leaves = [g for g in jax.tree.leaves(updates) if g is not None]
    finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(g)) for g in leaves]))
    unscaled = _common.tree_map_leaves(lambda g: g / state.loss_scale.astype(g.dtype), updates)
    new_updates, new_inner = inner.update(unscaled, state.inner_state, params)
    grow = state.step_counter == dynamic_growth_steps - 1
    loss_scale = jnp.where(
      finite, jnp.where(grow, state.loss_scale * 2.0, state.loss_scale), state.loss_scale * 0.5
    )
    step_counter = jnp.where(finite & ~grow, state.step_counter + 1, 0)
    new_updates = _common.tree_map_leaves(
      lambda u: jnp.where(finite, u, jnp.zeros_like(u)), new_updates
    )
    inner_state = jax.tree.map(
      lambda new, old: jnp.where(finite, new, old), new_inner, state.inner_state
    )
    return new_updates, DynamicLossScaleState(loss_scale, step_counter, inner_state)

  return optax.GradientTransformation(init_fn, update_fn)


def scale_loss(loss: jax.Array, state: Any) -> jax.Array:
  """Multiplies `loss` by the current scale of the :func:`dynamic_loss_scale` in `state`."""
  scaler = _common.find_state(
    state, DynamicLossScaleState, "wrap the optimizer in adamjax.dynamic_loss_scale"
  )
  return loss * scaler.loss_scale.astype(jnp.result_type(loss))
