"""The epsilon-hat Adam step of TensorFlow's `ApplyAdam` kernel and Keras's `Adam.update_step`.

Both compute, per variable and in the variable's dtype, the paper's section-2 form

  m = m + (g - m) * (1 - b1);  v = v + (g*g - v) * (1 - b2);  u = (m * alpha) / (sqrt(v) + eps)

with every product rounded before it is added. They differ only in how the scalars are rounded
(`alpha`, `1 - beta`, `eps`): each preset computes those as its framework does and hands them
here, so the arithmetic on the moments is written once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from adamjax import _common, _xla_exact


class EpsHatScalars(NamedTuple):
  """The step's scalars, already rounded to the variable dtype as the framework rounds them.

  Attributes:
    alpha: The step size with both bias corrections, `lr * sqrt(1 - b2^t) / (1 - b1^t)`.
    one_minus_beta1: `1 - beta1`, the first moment's interpolation weight.
    one_minus_beta2: `1 - beta2`, the second moment's.
    epsilon: Epsilon hat, added to the root of the uncorrected second moment.
  """

  alpha: jax.Array
  one_minus_beta1: jax.Array
  one_minus_beta2: jax.Array
  epsilon: jax.Array


def eps_hat_step(
  g: jax.Array,
  m: jax.Array,
  v: jax.Array,
  v_max: jax.Array | None,
  scalars: EpsHatScalars,
  no_fma: _xla_exact.Guard,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array | None]:
  """One variable's step: returns `(u, m, v, v_max)`, the positive step `u` and the new moments.

  `v_max` (AMSGrad, Keras's `velocity_hat`) is the running maximum of `v`, whose root then
  divides; `None` for plain Adam. `no_fma` rounds each product before it is added (as
  TensorFlow's CPU kernels and Keras op by op do), or is the identity to let XLA fuse.
  """
  dtype = m.dtype
  # The gradient arrives rounded, as it does in TF: a product computed upstream (a clip, an
  # unscale) must not fuse into `g - m` as an FMA.
  g = no_fma(g.astype(dtype))
  m = m + no_fma((g - m) * scalars.one_minus_beta1)
  v = v + no_fma((no_fma(jnp.square(g)) - v) * scalars.one_minus_beta2)
  v_used = v
  if v_max is not None:
    v_max = jnp.maximum(v_max, v)
    v_used = v_max
  step = (m * scalars.alpha) / (jnp.sqrt(v_used) + scalars.epsilon)
  return step, m, v, v_max


def eps_hat_update(
  updates: Any,
  mu: Any,
  nu: Any,
  nu_max: Any | None,
  scalars_for: Callable[[jnp.dtype], EpsHatScalars],
  no_fma: _xla_exact.Guard,
) -> tuple[Any, Any, Any, Any | None]:
  """:func:`eps_hat_step` over a tree: `(steps, mu, nu, nu_max)`; `None` update leaves pass.

  `scalars_for(dtype)` gives the scalars in each variable's dtype; `nu_max` is a tree like `nu`
  under AMSGrad and `None` otherwise (and is returned so).
  """

  def leaf(g, m, v, vm):
    return eps_hat_step(g, m, v, vm, scalars_for(m.dtype), no_fma)

  amsgrad = nu_max is not None
  nu_max_tree = nu_max if amsgrad else jax.tree.map(lambda _: None, nu)
  out = _common.tree_map_leaves(leaf, updates, mu, nu, nu_max_tree)
  steps, mu, nu, nu_max_tree = _common.tree_unzip(updates, out, 4)
  return steps, mu, nu, nu_max_tree if amsgrad else None
