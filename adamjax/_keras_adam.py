"""Adam with Keras 3 semantics (`keras.optimizers.Adam`): epsilon-hat, Keras's rounding order."""

# No `from __future__ import annotations`: optax's tools read `learning_rate`'s annotation at
# run time (`optax.ScalarOrSchedule` marks a preset that takes a schedule).
import functools
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from adamjax import _common, _xla_exact
from adamjax._accumulation import keras_gradient_accumulation
from adamjax._ema import ema
from adamjax._eps_hat import EpsHatScalars, eps_hat_update
from adamjax._keras_clip import keras_clip_by_global_norm, keras_clip_by_norm, keras_clip_by_value
from adamjax._keras_weight_decay import keras_weight_decay
from adamjax._loss_scale import unscale_gradients


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


def _keras_scalars(
  dtype: jnp.dtype, *, lr: Any, count_inc: jax.Array, beta_1: Any, beta_2: Any, epsilon: Any
) -> EpsHatScalars:
  """The scalars of `keras.optimizers.Adam.update_step`, rounded as Keras rounds them.

  Keras computes in the variable's dtype: `1 - beta` is Python (double) arithmetic rounded once
  to that dtype, and the beta powers are `pow` in that dtype.
  """
  t = count_inc.astype(dtype)
  beta_1_power = jnp.power(jnp.asarray(beta_1, dtype), t)
  beta_2_power = jnp.power(jnp.asarray(beta_2, dtype), t)
  return EpsHatScalars(
    alpha=jnp.asarray(lr, dtype) * jnp.sqrt(1 - beta_2_power) / (1 - beta_1_power),
    one_minus_beta1=jnp.asarray(1 - beta_1, dtype),
    one_minus_beta2=jnp.asarray(1 - beta_2, dtype),
    epsilon=jnp.asarray(epsilon, dtype),
  )


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
      a `LearningRateSchedule` at `optimizer.iterations`; a callable that takes no argument is
      called with none, as Keras calls it.
    beta_1: Decay rate of the first moment.
    beta_2: Decay rate of the second moment.
    epsilon: Keras's epsilon, "epsilon hat": added to the root of the *uncorrected* second
      moment.
    amsgrad: Keep the running maximum of the second moment and divide by its root.
    fused_multiply_add: If False (default), every product is rounded before it is added, as
      TensorFlow does and as Keras's JAX backend does op by op, even under `jax.jit`, where XLA
      would otherwise fuse them. If True, XLA may fuse
      multiply-adds, which reproduces a *jitted* Keras-on-JAX `stateless_apply` bit for bit.

  Returns:
    An `optax.GradientTransformation` with state :class:`ScaleByKerasAdamState`.

  References:
    Kingma & Ba 2015, the formula before section 2.1; `keras/src/optimizers/adam.py`.
  """
  _common.check_hyperparameter("learning_rate", learning_rate, allow_schedule=True)
  learning_rate = _common.keras_learning_rate(learning_rate)
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
    scalars = functools.partial(
      _keras_scalars, lr=lr, count_inc=count_inc, beta_1=beta_1, beta_2=beta_2, epsilon=epsilon
    )
    no_fma = _xla_exact.make_no_fma(state.count, not fused_multiply_add)
    steps, mu, nu, nu_max = eps_hat_update(
      updates, state.mu, state.nu, state.nu_max, scalars, no_fma
    )
    return steps, ScaleByKerasAdamState(count=count_inc, mu=mu, nu=nu, nu_max=nu_max)

  return optax.GradientTransformation(init_fn, update_fn)


def _check_keras_learning_rate(learning_rate: Any) -> None:
  # Keras refuses integer learning rates ("should be float, or an instance of
  # LearningRateSchedule, or a callable"); so do we, with the same kind of error.
  if isinstance(learning_rate, (bool, int, np.integer)):
    raise ValueError(
      f"learning_rate should be a float or a schedule, got the integer {learning_rate!r} "
      "(Keras refuses integers too: write 1.0, not 1)"
    )
  # Keras checks nothing else: a negative learning rate ascends, as in Keras.
  _common.check_hyperparameter("learning_rate", learning_rate, allow_schedule=True)


def _keras_clip(clipnorm, clipvalue, global_clipnorm, fused_multiply_add):
  given = {
    k: v
    for k, v in [
      ("clipnorm", clipnorm),
      ("clipvalue", clipvalue),
      ("global_clipnorm", global_clipnorm),
    ]
    if v is not None
  }
  if len(given) > 1:
    raise ValueError(
      "Only one of clipnorm, clipvalue and global_clipnorm can be set, got "
      + ", ".join(f"{k}={v!r}" for k, v in given.items())
    )
  # As in Keras, a clip option is active only when nonzero (an injected, traced one is active).
  if _common.given(clipnorm):
    return [keras_clip_by_norm(clipnorm, fused_multiply_add=fused_multiply_add)]
  if _common.given(global_clipnorm):
    return [keras_clip_by_global_norm(global_clipnorm, fused_multiply_add=fused_multiply_add)]
  if _common.given(clipvalue):
    return [keras_clip_by_value(clipvalue)]
  return []


def keras_adam(
  learning_rate: optax.ScalarOrSchedule = 0.001,
  beta_1: Any = 0.9,
  beta_2: Any = 0.999,
  epsilon: Any = 1e-7,
  amsgrad: bool = False,
  weight_decay: Any | None = None,
  clipnorm: Any | None = None,
  clipvalue: Any | None = None,
  global_clipnorm: Any | None = None,
  use_ema: bool = False,
  ema_momentum: Any = 0.99,
  ema_overwrite_frequency: int | None = None,
  loss_scale_factor: Any | None = None,
  gradient_accumulation_steps: int | None = None,
  name: str | None = None,
  *,
  exclude_from_weight_decay: Sequence[str] | None = None,
  weight_decay_mask: Any | None = None,
  fused_multiply_add: bool = False,
) -> optax.GradientTransformation:
  r"""Adam as `keras.optimizers.Adam`: same constructor, options, defaults and float32 results.

  Port a Keras model by renaming the constructor: `keras.optimizers.Adam(1e-3, clipnorm=1.0)`
  becomes `adamjax.keras_adam(1e-3, clipnorm=1.0)`. Every Keras option is here with Keras's
  default and Keras's order of operations: unscale by `loss_scale_factor`; accumulate (sum,
  then divide); clip; decay the weights; the Adam step; the moving average (first step
  copies; overwrite every `ema_overwrite_frequency` iterations). Schedules are evaluated at
  Keras's raw 0-based iteration. Results equal Keras 3 on the JAX backend bit for bit and on
  the TensorFlow backend within 2 ulps in the tested cases (see the README's parity tables).

  .. warning::
    `epsilon` here is the paper's *epsilon hat*, added to :math:`\sqrt{v_t}` before bias
    correction, with Keras's default 1e-7. It is not optax's `eps`: for a gradient of 1e-8 the
    first Keras step is about 1e-4 of the learning rate, while `optax.adam(eps=1e-7)` takes
    nearly a full learning-rate step. The two formulations are different optimizers for small
    gradients; `optax.adam(eps=1e-7)` does not reproduce Keras.

  Args:
    learning_rate: A float or a schedule `iteration -> lr` (an optax schedule, or a Keras
      `LearningRateSchedule` when Keras runs on the JAX backend), evaluated at the 0-based raw
      iteration as Keras does; or, as in Keras, a callable of no argument (`lambda: 0.1`),
      called at each update (when it is traced, under `jax.jit`). Integers are refused, as in
      Keras; negative values ascend. NumPy and JAX scalars of any float dtype (those of
      `optax.inject_hyperparams` included) are accepted, as in optax.
    beta_1: Decay rate of the first moment.
    beta_2: Decay rate of the second moment.
    epsilon: Epsilon hat (see the warning).
    amsgrad: Use AMSGrad, Keras's `velocity_hat`.
    weight_decay: Keras's decoupled decay `w -= w * weight_decay * lr` before each step
      (:func:`keras_weight_decay`); None or 0 for none.
    clipnorm: Clip each gradient tensor's L2 norm (:func:`keras_clip_by_norm`).
    clipvalue: Clip each gradient element (:func:`keras_clip_by_value`).
    global_clipnorm: Clip the joint L2 norm (:func:`keras_clip_by_global_norm`). At most one
      of the three clip options may be set.
    use_ema: Keep a moving average of the weights (:func:`ema`; read it with
      :func:`ema_params`).
    ema_momentum: The moving average's momentum.
    ema_overwrite_frequency: Write the average into the weights every this many iterations.
    loss_scale_factor: Divide the gradients by this fixed loss scale first
      (:func:`unscale_gradients`).
    gradient_accumulation_steps: Update once every this many calls, on the mean of their
      gradients (:func:`keras_gradient_accumulation`); an integer >= 2.
    name: Accepted for signature compatibility with Keras; unused.
    exclude_from_weight_decay: Keras's `optimizer.exclude_from_weight_decay(var_names=...)`:
      regular expressions searched in each parameter's '/'-joined tree path.
    weight_decay_mask: An optax-style mask (tree of booleans or a callable of the params)
      of the parameters to decay.
    fused_multiply_add: If False (default), every product is rounded before it is added, as
      TensorFlow does and Keras's JAX backend does op by op, even under `jax.jit`. True lets
      XLA fuse multiply-adds, which reproduces a *jitted* Keras-on-JAX run bit for bit.

  Returns:
    An `optax.GradientTransformation` chaining the pieces above around
    :func:`scale_by_keras_adam`. `optax.tree_utils.tree_get(state, "count")` is Keras's
    `iterations` (in accumulated steps).

  Raises:
    ValueError: for what Keras refuses (two clip options, accumulation steps < 2, an integer
      learning rate, `ema_momentum` outside [0, 1]) and for invalid values.

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
    `keras.optimizers.Adam`, `keras/src/optimizers/adam.py` and `base_optimizer.py`;
    Kingma & Ba 2015.
  """
  del name
  _check_keras_learning_rate(learning_rate)
  learning_rate = _common.keras_learning_rate(learning_rate)
  steps = _common.check_static_int(
    "gradient_accumulation_steps", gradient_accumulation_steps, low=2
  )
  lr = learning_rate
  if steps and callable(learning_rate):
    # Keras evaluates the schedule at its raw iteration counter, which counts every call; the
    # pieces inside the accumulation wrapper count updates, so map update k to call k*K + K-1.
    lr = lambda count: learning_rate(count * steps + (steps - 1))  # noqa: E731
  fma = fused_multiply_add
  update = _keras_clip(clipnorm, clipvalue, global_clipnorm, fma)
  update += [
    scale_by_keras_adam(lr, beta_1, beta_2, epsilon, amsgrad, fused_multiply_add=fma),
    optax.scale(-1.0),
  ]
  if _common.given(weight_decay):
    update.append(
      keras_weight_decay(
        weight_decay,
        lr,
        exclude=exclude_from_weight_decay,
        mask=weight_decay_mask,
        fused_multiply_add=fma,
      )
    )
  elif weight_decay is not None:
    _common.check_hyperparameter("weight_decay", weight_decay)
  pipeline = (
    []
    if loss_scale_factor is None
    else [unscale_gradients(loss_scale_factor, fused_multiply_add=fma)]
  )
  if steps:
    pipeline.append(
      keras_gradient_accumulation(optax.chain(*update), steps, fused_multiply_add=fma)
    )
  else:
    pipeline.extend(update)
  if use_ema:
    pipeline.append(
      ema(
        ema_momentum,
        ema_overwrite_frequency,
        gradient_accumulation_steps=steps or 1,
        fused_multiply_add=fma,
      )
    )
  return optax.chain(*pipeline)


def keras_adamw(
  learning_rate: optax.ScalarOrSchedule = 0.001,
  weight_decay: Any = 0.004,
  beta_1: Any = 0.9,
  beta_2: Any = 0.999,
  epsilon: Any = 1e-7,
  amsgrad: bool = False,
  clipnorm: Any | None = None,
  clipvalue: Any | None = None,
  global_clipnorm: Any | None = None,
  use_ema: bool = False,
  ema_momentum: Any = 0.99,
  ema_overwrite_frequency: int | None = None,
  loss_scale_factor: Any | None = None,
  gradient_accumulation_steps: int | None = None,
  name: str | None = None,
  *,
  exclude_from_weight_decay: Sequence[str] | None = None,
  weight_decay_mask: Any | None = None,
  fused_multiply_add: bool = False,
) -> optax.GradientTransformation:
  """AdamW as `keras.optimizers.AdamW`: :func:`keras_adam` with `weight_decay=0.004`.

  Keras's AdamW is its Adam with the base optimizer's decoupled, learning-rate-scaled decay
  (`w -= w * weight_decay * lr`, before the step), and the same signature order as Keras's
  (`weight_decay` second). Every argument is as in :func:`keras_adam`.

  Raises:
    ValueError: as :func:`keras_adam`, and for `weight_decay=None`, which Keras's AdamW refuses
      with the same message.

  Example:
    >>> import adamjax
    >>> tx = adamjax.keras_adamw(1e-3, exclude_from_weight_decay=["bias"])
  """
  if weight_decay is None:
    raise ValueError("Argument `weight_decay` must be a float. Received: weight_decay=None")
  return keras_adam(
    learning_rate,
    beta_1,
    beta_2,
    epsilon,
    amsgrad,
    weight_decay,
    clipnorm,
    clipvalue,
    global_clipnorm,
    use_ema,
    ema_momentum,
    ema_overwrite_frequency,
    loss_scale_factor,
    gradient_accumulation_steps,
    name,
    exclude_from_weight_decay=exclude_from_weight_decay,
    weight_decay_mask=weight_decay_mask,
    fused_multiply_add=fused_multiply_add,
  )
