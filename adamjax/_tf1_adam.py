"""Adam as `tf.compat.v1.train.AdamOptimizer`: TensorFlow's `ApplyAdam` kernel, dense."""

# No `from __future__ import annotations`: optax's tools read `learning_rate`'s annotation at
# run time (`optax.ScalarOrSchedule` marks a preset that takes a schedule).
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from adamjax import _common, _xla_exact
from adamjax._eps_hat import EpsHatScalars, eps_hat_update


class ScaleByTF1AdamState(NamedTuple):
  """State of :func:`scale_by_tf1_adam`.

  Attributes:
    count: int32 scalar step counter (TF1 keeps none; kept for optax tooling, saturating).
    mu: First moments, TF's `<var>/Adam` slots.
    nu: Second moments, TF's `<var>/Adam_1` slots.
    beta1_power: float32 scalar, TF's non-slot `beta1_power`: a running product of `beta1`.
    beta2_power: float32 scalar, TF's `beta2_power`.
  """

  count: jax.Array
  mu: optax.Updates
  nu: optax.Updates
  beta1_power: jax.Array
  beta2_power: jax.Array


def _tf1_scalars(
  dtype: jnp.dtype,
  *,
  lr: Any,
  beta1: Any,
  beta2: Any,
  epsilon: Any,
  beta1_power: jax.Array,
  beta2_power: jax.Array,
) -> EpsHatScalars:
  """The scalars of TensorFlow's CPU `ApplyAdamNonCuda` kernel (`training_ops.cc`).

  Every scalar is cast to the variable dtype and `1 - beta` is a subtraction in that dtype
  (`T(1) - beta1()`: 0.100000024 for beta1 = 0.9 in float32, not 0.1).
  """
  cast = lambda x: jnp.asarray(x).astype(dtype)  # noqa: E731
  one = jnp.ones([], dtype)
  return EpsHatScalars(
    alpha=cast(lr) * jnp.sqrt(one - cast(beta2_power)) / (one - cast(beta1_power)),
    one_minus_beta1=one - cast(beta1),
    one_minus_beta2=one - cast(beta2),
    epsilon=cast(epsilon),
  )


def scale_by_tf1_adam(
  learning_rate: optax.ScalarOrSchedule = 1.0,
  beta1: Any = 0.9,
  beta2: Any = 0.999,
  epsilon: Any = 1e-8,
  *,
  fused_multiply_add: bool = False,
) -> optax.GradientTransformation:
  r"""Rescales updates as TensorFlow's `ApplyAdam` kernel, learning rate included.

  .. math::
    \alpha_t = \eta\sqrt{1-p_2}/(1-p_1),\quad m_t = m + (g - m)(1-\beta_1),\quad
    v_t = v + (g^2 - v)(1-\beta_2),\quad u_t = (m_t\,\alpha_t)/(\sqrt{v_t} + \hat\varepsilon),

  where :math:`p_1, p_2` are float32 running products of the betas (starting at
  :math:`\beta_1, \beta_2`, multiplied after each step), not `pow`: they differ from the
  correctly rounded :math:`\beta^t` in the last bits, and TensorFlow uses the product.

  Args:
    learning_rate: A float or a schedule evaluated at the 0-based step count.
    beta1: Decay rate of the first moment.
    beta2: Decay rate of the second moment.
    epsilon: Epsilon hat, added to the root of the uncorrected second moment (default 1e-8,
      TensorFlow 1's default; Keras uses 1e-7).
    fused_multiply_add: If False (default), products are rounded before they are added, as
      TensorFlow's CPU kernel does, also under `jax.jit`. True lets XLA fuse multiply-adds.

  Returns:
    An `optax.GradientTransformation` with state :class:`ScaleByTF1AdamState`; the update is
    the positive step (see :func:`tf1_adam`).

  References:
    `tensorflow/python/training/adam.py`, `tensorflow/core/kernels/training_ops.cc`.
  """
  # TensorFlow checks nothing; a negative learning rate ascends, as in TensorFlow.
  _common.check_hyperparameter("learning_rate", learning_rate, allow_schedule=True)
  _common.check_hyperparameter("beta1", beta1, low=0.0, high=1.0)
  _common.check_hyperparameter("beta2", beta2, low=0.0, high=1.0)
  _common.check_hyperparameter("epsilon", epsilon, low=0.0)

  def init_fn(params):
    _common.check_betas_representable(params, "tf1_adam", beta1=beta1, beta2=beta2)
    return ScaleByTF1AdamState(
      count=jnp.zeros([], jnp.int32),
      mu=optax.tree.zeros_like(params),
      nu=optax.tree.zeros_like(params),
      beta1_power=jnp.asarray(beta1, jnp.float32),
      beta2_power=jnp.asarray(beta2, jnp.float32),
    )

  def update_fn(updates, state, params=None):
    del params
    _common.check_updates_match(updates, state.nu)
    lr = _common.resolve(learning_rate, state.count)
    scalars = functools.partial(
      _tf1_scalars,
      lr=lr,
      beta1=beta1,
      beta2=beta2,
      epsilon=epsilon,
      beta1_power=state.beta1_power,
      beta2_power=state.beta2_power,
    )
    no_fma = _xla_exact.make_no_fma(state.count, not fused_multiply_add)
    steps, mu, nu, _ = eps_hat_update(updates, state.mu, state.nu, None, scalars, no_fma)
    # TF's `_finish`: after every variable is updated, beta_power *= beta (float32).
    return steps, ScaleByTF1AdamState(
      count=_common.safe_increment(state.count),
      mu=mu,
      nu=nu,
      beta1_power=state.beta1_power * jnp.asarray(beta1, jnp.float32),
      beta2_power=state.beta2_power * jnp.asarray(beta2, jnp.float32),
    )

  return optax.GradientTransformation(init_fn, update_fn)


def tf1_adam(
  learning_rate: optax.ScalarOrSchedule = 0.001,
  beta1: Any = 0.9,
  beta2: Any = 0.999,
  epsilon: Any = 1e-8,
  use_locking: bool = False,
  name: str = "Adam",
  *,
  fused_multiply_add: bool = False,
) -> optax.GradientTransformation:
  r"""Adam as `tf.compat.v1.train.AdamOptimizer` (dense), to float32 rounding.

  Port TF1 code by renaming the constructor: `tf.compat.v1.train.AdamOptimizer(0.001)` becomes
  `adamjax.tf1_adam(0.001)`. Matches TensorFlow's `ApplyAdam` kernel within 2 ulps per element
  (bit for bit in the tested cases) over 1,000 steps, jitted or not.

  .. warning::
    `epsilon` is epsilon hat (see :func:`keras_adam`), and the default is 1e-8, not Keras's
    1e-7. TensorFlow's docs suggest 1.0 or 0.1 for some models; it is not optax's `eps`.

  Args:
    learning_rate: A float or a schedule evaluated at the 0-based step count.
    beta1: Decay rate of the first moment.
    beta2: Decay rate of the second moment.
    epsilon: Epsilon hat.
    use_locking: Accepted for signature compatibility; it has no numeric effect in TF either.
    name: Accepted for signature compatibility; unused.
    fused_multiply_add: See :func:`scale_by_tf1_adam`.

  Returns:
    An `optax.GradientTransformation`: :func:`scale_by_tf1_adam` followed by a sign flip.

  Example:
    >>> import adamjax, jax.numpy as jnp, optax
    >>> tx = adamjax.tf1_adam(0.001)
    >>> state = tx.init(jnp.zeros(2))
    >>> updates, state = tx.update(jnp.ones(2), state)
    >>> print(optax.tree_utils.tree_get(state, "beta1_power"))
    0.80999994

  References:
    `tf.compat.v1.train.AdamOptimizer`; Kingma & Ba 2015, section 2.
  """
  del use_locking, name
  return optax.chain(
    scale_by_tf1_adam(learning_rate, beta1, beta2, epsilon, fused_multiply_add=fused_multiply_add),
    optax.scale(-1.0),
  )
