"""Keras's exponential moving average of the weights (`use_ema`), as a transformation."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from adamjax import _common, _xla_exact


class EmaState(NamedTuple):
  """State of :func:`ema`.

  Attributes:
    step: int32 number of updates seen (Keras's `iterations` times the accumulation steps).
    ema: The moving average of the parameters (Keras's `average` variables); read it with
      :func:`ema_params`.
  """

  step: jax.Array
  ema: optax.Params


def ema(
  momentum: Any = 0.99,
  overwrite_frequency: int | None = None,
  *,
  gradient_accumulation_steps: int = 1,
  fused_multiply_add: bool = False,
) -> optax.GradientTransformation:
  r"""Keeps Keras's moving average of the parameters, and optionally writes it back.

  Goes last in a chain: after the update, with :math:`\theta' = \theta + u`,

  .. math::
    \mu = [\text{iterations} \ne 0]\cdot m,\qquad
    \bar\theta \leftarrow \mu\,\bar\theta + (1 - \mu)\,\theta',

  so the first step copies the parameters. Every `overwrite_frequency` iterations the update
  is replaced by one that sets the parameters to the average (exact unless a parameter and its
  average differ by more than a factor of two, where the result is within an ulp).

  Unlike `optax.ema`, which averages the *updates* with a debiasing option, this averages the
  parameters after each step, as `keras.optimizers.Optimizer(use_ema=True)` does.

  Args:
    momentum: Keras's `ema_momentum`, in [0, 1].
    overwrite_frequency: Keras's `ema_overwrite_frequency`: write the average into the
      parameters every this many iterations; None (or 0, as in Keras) never does (read it with :func:`ema_params`
      instead, as Keras's `finalize_variable_values` does at the end of `fit`).
    gradient_accumulation_steps: Keras counts `iterations` in accumulated steps; set this to the
      accumulation factor when the optimizer accumulates gradients.
    fused_multiply_add: Let XLA fuse the average's multiply-adds under jit.

  Returns:
    An `optax.GradientTransformation` that needs `params` in `update`.

  Example:
    >>> import adamjax, jax.numpy as jnp, optax
    >>> tx = optax.chain(optax.sgd(1.0), adamjax.ema(momentum=0.5))
    >>> params = jnp.array([0.0])
    >>> state = tx.init(params)
    >>> for _ in range(2):
    ...   updates, state = tx.update(jnp.array([-1.0]), state, params)
    ...   params = optax.apply_updates(params, updates)
    >>> print(params, adamjax.ema_params(state))
    [2.] [1.5]

  References:
    `keras/src/optimizers/base_optimizer.py` (`_update_model_variables_moving_average`),
    `keras/src/backend/jax/optimizer.py`.
  """
  _common.check_hyperparameter("ema_momentum", momentum, low=0.0, high=1.0, high_inclusive=True)
  overwrite_frequency = _common.check_static_int(
    "ema_overwrite_frequency", overwrite_frequency, low=0
  )
  overwrite_frequency = overwrite_frequency or None  # Keras reads 0 as "never", as None

  def init_fn(params):
    return EmaState(step=jnp.zeros([], jnp.int32), ema=optax.tree.zeros_like(params))

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("ema needs the params: call update(grads, state, params)")
    iterations = state.step // gradient_accumulation_steps
    r = _xla_exact.make_no_fma(state.step, not fused_multiply_add)

    def average(u, p, avg):
      new_p = p + u
      mu = (iterations != 0).astype(p.dtype) * jnp.asarray(momentum, p.dtype)
      return r(mu * avg) + r((1 - mu) * new_p)

    new_ema = _common.tree_map_leaves(average, updates, params, state.ema)
    if overwrite_frequency is not None:
      overwrite = (iterations + 1) % overwrite_frequency == 0
      updates = _common.tree_map_leaves(
        lambda u, p, avg: jnp.where(overwrite, avg - p, u), updates, params, new_ema
      )
    return updates, EmaState(step=_common.safe_increment(state.step), ema=new_ema)

  return optax.GradientTransformation(init_fn, update_fn)


def ema_params(state: Any) -> optax.Params:
  """The moving average of the parameters kept by :func:`ema` (or `keras_adam(use_ema=True)`).

  Args:
    state: An optimizer state that contains exactly one :class:`EmaState`.

  Returns:
    The averaged parameters, a tree like the params.

  Raises:
    ValueError: if the state holds no moving average (built without `use_ema`/`ema`).
  """
  return _common.find_state(
    state, EmaState, "build the optimizer with use_ema=True or chain adamjax.ema()"
  ).ema
