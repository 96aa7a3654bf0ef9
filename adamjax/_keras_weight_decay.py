"""Keras's decoupled weight decay, applied to the variable before the optimizer's step."""

# No `from __future__ import annotations`: optax's tools read `learning_rate`'s annotation at
# run time (`optax.ScalarOrSchedule` marks a preset that takes a schedule).
import re
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from adamjax import _common, _xla_exact


class KerasWeightDecayState(NamedTuple):
  """State of :func:`keras_weight_decay`: `step` evaluates a learning-rate schedule."""

  step: jax.Array


def path_name(path: tuple[Any, ...]) -> str:
  """A parameter's tree path as a '/'-joined name, e.g. `('Dense_0', 'kernel') -> 'Dense_0/kernel'`."""
  parts = []
  for key in path:
    for attr in ("key", "name", "idx"):
      if hasattr(key, attr):
        parts.append(str(getattr(key, attr)))
        break
    else:
      parts.append(str(key))
  return "/".join(parts)


def decay_mask(
  params: Any,
  exclude: Sequence[str] | None = None,
  mask: Any | Callable[[Any], Any] | None = None,
) -> Any:
  """The tree of booleans saying which parameters are decayed.

  Args:
    params: The parameters.
    exclude: Patterns as Keras's `exclude_from_weight_decay(var_names=...)`: a parameter is
      excluded when `re.search("|".join(exclude), name)` matches its '/'-joined tree path.
    mask: An optax-style mask: a tree of booleans (True: decay) or a callable returning one.
  """
  if callable(mask):
    mask = mask(params)
  if mask is None:
    mask = jax.tree.map(lambda _: True, params)
  if exclude:
    pattern = re.compile("|".join(exclude))
    excluded = jax.tree_util.tree_map_with_path(
      lambda path, _: pattern.search(path_name(path)) is not None, params
    )
    mask = jax.tree.map(lambda keep, out: bool(keep) and not out, mask, excluded)
  return mask


def keras_weight_decay(
  weight_decay: Any,
  learning_rate: optax.ScalarOrSchedule = 0.001,
  *,
  exclude: Sequence[str] | None = None,
  mask: Any | Callable[[Any], Any] | None = None,
  fused_multiply_add: bool = False,
) -> optax.GradientTransformation:
  r"""Keras's weight decay, :math:`\theta \leftarrow \theta - (\theta\,\lambda)\,\eta`, before the step.

  Keras decays the *variable* before the optimizer's step, for every optimizer; this
  transformation goes *after* the step in a chain (it needs the step to combine the two the
  way Keras sequences them) and returns the update that takes `params` to
  `(params - params * wd * lr) + step`, rounded as Keras rounds it.

  Args:
    weight_decay: The decay rate :math:`\lambda` (Keras's `weight_decay`).
    learning_rate: The learning rate :math:`\eta`, a float or a schedule evaluated at the
      0-based step, as the optimizer's own.
    exclude: Keras's `exclude_from_weight_decay(var_names=...)`: regular expressions searched
      in each parameter's '/'-joined tree path (for example `["bias", "norm"]`).
    mask: An optax-style mask (tree of booleans, or a callable of the params); False leaves are
      not decayed.
    fused_multiply_add: Let XLA fuse `params - (params * wd) * lr` under jit.

  Returns:
    An `optax.GradientTransformation` that needs `params` in `update`.

  Example:
    >>> import adamjax, jax.numpy as jnp, optax
    >>> tx = optax.chain(optax.sgd(0.0), adamjax.keras_weight_decay(0.004, 1.0))
    >>> params = {"kernel": jnp.array([2.0])}
    >>> updates, _ = tx.update({"kernel": jnp.zeros(1)}, tx.init(params), params)
    >>> print(optax.apply_updates(params, updates)["kernel"])  # 2 - 2 * 0.004 * 1.0
    [1.992]

  References:
    `keras/src/optimizers/base_optimizer.py` (`_apply_weight_decay`,
    `exclude_from_weight_decay`).
  """
  # Keras checks neither: a negative decay or learning rate is taken as given.
  _common.check_hyperparameter("weight_decay", weight_decay)
  _common.check_hyperparameter("learning_rate", learning_rate, allow_schedule=True)
  learning_rate = _common.keras_learning_rate(learning_rate)

  def init_fn(params):
    del params
    return KerasWeightDecayState(step=jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("keras_weight_decay needs the params: call update(grads, state, params)")
    lr = _common.resolve(learning_rate, state.step)
    r = _xla_exact.make_no_fma(state.step, not fused_multiply_add)

    def decayed_update(u, p, decay):
      if not decay:
        return u
      wd_, lr_ = jnp.asarray(weight_decay, p.dtype), jnp.asarray(lr, p.dtype)
      decayed = p - r(r(p * wd_) * lr_)
      # Keras subtracts the step from the decayed variable; the update is the difference from
      # `params`, exact (Sterbenz) unless a parameter jumps by more than a factor of two.
      return (decayed + u) - p

    updates = _common.tree_map_leaves(
      decayed_update, updates, params, decay_mask(params, exclude, mask)
    )
    return updates, KerasWeightDecayState(step=_common.safe_increment(state.step))

  return optax.GradientTransformation(init_fn, update_fn)
