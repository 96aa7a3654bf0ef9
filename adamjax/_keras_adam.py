"""Adam with Keras 3 semantics (`keras.optimizers.Adam`): epsilon-hat, Keras's rounding order."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from adamjax import _common


class ScaleByKerasAdamState(NamedTuple):
  """State of :func:`scale_by_keras_adam`, named as optax names Adam's state.

  Attributes:
    count: int32 scalar, Keras's `optimizer.iterations` (saturates instead of wrapping).
    mu: First moments, Keras's `momentum` slots.
    nu: Second moments, Keras's `velocity` slots.
    nu_max: Running maximum of `nu`, Keras's `velocity_hat` slots; `None` unless `amsgrad`.
  """

  count: jax.Array
  mu: optax.Updates
  nu: optax.Updates
  nu_max: optax.Updates | None


def _keras_step(
    g: jax.Array,
    m: jax.Array,
    v: jax.Array,
    v_max: jax.Array | None,
    *,
    lr: jax.Array,
    count_inc: jax.Array,
    beta_1: Any,
    beta_2: Any,
    epsilon: Any,
    round_products: bool,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array | None]:
  """One leaf of `keras.optimizers.Adam.update_step`, operation for operation.

  Keras computes in the variable's dtype; `1 - beta` is Python (double) arithmetic rounded once
  to that dtype; the beta powers are `pow` in that dtype; moments use `m + (g - m) * (1 - b1)`.
  """
  r = _common.rounded if round_products else (lambda x: x)
  dtype = m.dtype
  g = g.astype(dtype)
  t = count_inc.astype(dtype)
  beta_1_power = jnp.power(jnp.asarray(beta_1, dtype), t)
  beta_2_power = jnp.power(jnp.asarray(beta_2, dtype), t)
  alpha = jnp.asarray(lr, dtype) * jnp.sqrt(1 - beta_2_power) / (1 - beta_1_power)
  m = m + r((g - m) * jnp.asarray(1 - beta_1, dtype))
  v = v + r((r(jnp.square(g)) - v) * jnp.asarray(1 - beta_2, dtype))
  v_used = v
  if v_max is not None:
    v_max = jnp.maximum(v_max, v)
    v_used = v_max
  step = (m * alpha) / (jnp.sqrt(v_used) + jnp.asarray(epsilon, dtype))
  return step, m, v, v_max


def scale_by_keras_adam(
    learning_rate: optax.ScalarOrSchedule = 1.0,
    beta_1: Any = 0.9,
    beta_2: Any = 0.999,
    epsilon: Any = 1e-7,
    amsgrad: bool = False,
    *,
    fused_multiply_add: bool = False,
) -> optax.GradientTransformation:
  r"""Rescales updates as `keras.optimizers.Adam.update_step`, learning rate included.

  .. math::
    m_t = m_{t-1} + (g_t - m_{t-1})(1-\beta_1),\quad
    v_t = v_{t-1} + (g_t^2 - v_{t-1})(1-\beta_2),\\
    \alpha_t = \eta\sqrt{1-\beta_2^t}/(1-\beta_1^t),\quad
    u_t = (m_t\,\alpha_t) / (\sqrt{v_t} + \hat\varepsilon).

  Returns the positive step :math:`u_t`; :func:`keras_adam` negates it. The learning rate is
  folded into :math:`\alpha_t` as Keras does, so the rounding matches Keras only when the
  learning rate is given here (chaining `optax.scale_by_learning_rate` after a unit learning
  rate is close, not bit-exact).

  Args:
    learning_rate: A float or a schedule, evaluated at the 0-based `count` as Keras evaluates
      a `LearningRateSchedule` at `optimizer.iterations`.
    beta_1: Decay rate of the first moment.
    beta_2: Decay rate of the second moment.
    epsilon: Keras's epsilon, "epsilon hat": added to the root of the *uncorrected* second
      moment.
    amsgrad: Keep the running maximum of the second moment and divide by its root.
    fused_multiply_add: If False (default), every product is rounded before it is added, as
      TensorFlow does and as Keras's JAX backend does op by op, even under `jax.jit`, where XLA
      would otherwise fuse them (see :func:`adamjax._common.rounded`). If True, XLA may fuse
      multiply-adds, which reproduces a *jitted* Keras-on-JAX `stateless_apply` bit for bit.

  Returns:
    An `optax.GradientTransformation` with state :class:`ScaleByKerasAdamState`.

  References:
    Kingma & Ba 2015, the formula before section 2.1; `keras/src/optimizers/adam.py`.
  """
  _common.check_hyperparameter("learning_rate", learning_rate, low=0.0, allow_schedule=True)
  _common.check_hyperparameter("beta_1", beta_1, low=0.0, high=1.0)
  _common.check_hyperparameter("beta_2", beta_2, low=0.0, high=1.0)
  _common.check_hyperparameter("epsilon", epsilon, low=0.0)

  def init_fn(params):
    _common.check_betas_representable(params, "keras_adam", beta_1=beta_1, beta_2=beta_2)
    return ScaleByKerasAdamState(
        count=jnp.zeros([], jnp.int32),
        mu=optax.tree.zeros_like(params),
        nu=optax.tree.zeros_like(params),
        nu_max=optax.tree.zeros_like(params) if amsgrad else None,
    )

  def update_fn(updates, state, params=None):
    del params
    _common.check_updates_match(updates, state.nu)
    lr = _common.resolve(learning_rate, state.count)
    count_inc = _common.safe_increment(state.count)
    step = lambda g, m, v, vm: _keras_step(  # noqa: E731
        g, m, v, vm, lr=lr, count_inc=count_inc, beta_1=beta_1, beta_2=beta_2,
        epsilon=epsilon, round_products=not fused_multiply_add,
    )
    nu_max = state.nu_max if amsgrad else jax.tree.map(lambda _: None, state.nu)
    out = _common.tree_map_leaves(step, updates, state.mu, state.nu, nu_max)
    steps, mu, nu, nu_max = _common.tree_unzip(updates, out, 4)
    return steps, ScaleByKerasAdamState(
        count=count_inc, mu=mu, nu=nu, nu_max=nu_max if amsgrad else None
    )

  return optax.GradientTransformation(init_fn, update_fn)


def keras_adam(
    learning_rate: optax.ScalarOrSchedule = 0.001,
    beta_1: Any = 0.9,
    beta_2: Any = 0.999,
    epsilon: Any = 1e-7,
    amsgrad: bool = False,
    *,
    name: str | None = None,
    fused_multiply_add: bool = False,
) -> optax.GradientTransformation:
  r"""Adam as `keras.optimizers.Adam`: same constructor, defaults and float32 results.

  Port a Keras model by renaming the constructor: `keras.optimizers.Adam(1e-3)` becomes
  `adamjax.keras_adam(1e-3)`. Results equal Keras 3 on the JAX backend bit for bit and Keras 3
  on the TensorFlow backend bit for bit in the tested cases (bounded at 2 ulps per element in
  the tests), over 1,000 steps of gradients from 1e-8 to 1e2, jitted or not.

  .. warning::
    `epsilon` here is the paper's *epsilon hat*, added to :math:`\sqrt{v_t}` before bias
    correction, with Keras's default 1e-7. It is not optax's `eps`: for a gradient of 1e-8 the
    first Keras step is about 1e-4 of the learning rate, while `optax.adam(eps=1e-7)` takes
    nearly a full learning-rate step. The two formulations are different optimizers for small
    gradients; `optax.adam(eps=1e-7)` does not reproduce Keras.

  Args:
    learning_rate: A float or a schedule `count -> lr` (Keras's `LearningRateSchedule` is
      evaluated at the 0-based iteration, and so is this).
    beta_1: Decay rate of the first moment.
    beta_2: Decay rate of the second moment.
    epsilon: Epsilon hat (see the warning).
    amsgrad: Use AMSGrad, Keras's `velocity_hat`.
    name: Accepted for signature compatibility with Keras; unused.
    fused_multiply_add: See :func:`scale_by_keras_adam`. The default keeps TensorFlow's rounding
      under `jax.jit`; True reproduces jitted Keras-on-JAX instead.

  Returns:
    An `optax.GradientTransformation`: :func:`scale_by_keras_adam` followed by a sign flip.
    `optax.tree_utils.tree_get(state, "count")` is Keras's `iterations`.

  Example:
    >>> import adamjax, jax.numpy as jnp, optax
    >>> tx = adamjax.keras_adam()             # keras.optimizers.Adam()
    >>> params = {"kernel": jnp.ones((2, 2))}
    >>> state = tx.init(params)
    >>> updates, state = tx.update({"kernel": jnp.full((2, 2), 0.1)}, state, params)
    >>> params = optax.apply_updates(params, updates)
    >>> int(optax.tree_utils.tree_get(state, "count"))
    1

  References:
    `keras.optimizers.Adam`, `keras/src/optimizers/adam.py`; Kingma & Ba 2015.
  """
  del name
  return optax.chain(
      scale_by_keras_adam(
          learning_rate, beta_1, beta_2, epsilon, amsgrad, fused_multiply_add=fused_multiply_add
      ),
      optax.scale(-1.0),
  )
