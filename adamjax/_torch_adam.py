"""Adam as `torch.optim.Adam` / `torch.optim.AdamW` (single-tensor path), to float32 rounding.

Three facts about PyTorch 2.13's CPU step decide the numerics (measured; the parity tests check
them): its `lerp_`, `addcmul_` and `add(alpha=)` kernels are fused multiply-adds on AVX2 and
AVX-512 machines; the bias corrections are float64 powers of the exact double betas; and its
float32 `sqrt` comes from MKL on x86 Linux wheels and is not correctly rounded. JAX without x64
has neither float64 nor an FMA primitive; `_double_float` builds both exactly from float32
operations (double-float scalars, an emulated FMA), and this module uses them where PyTorch does.
"""

# No `from __future__ import annotations`: optax's tools read `learning_rate`'s annotation at
# run time (`optax.ScalarOrSchedule` marks a preset that takes a schedule).
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from adamjax import _common, _double_float, _xla_exact

# PyTorch keeps `state["step"]` as a float32 tensor: 2**24 + 1 rounds back to 2**24, so the step
# that enters the bias corrections stops there.
_MAX_TORCH_STEP = 2**24


class ScaleByTorchAdamState(NamedTuple):
  """State of :func:`scale_by_torch_adam`, named as optax names Adam's state.

  Attributes:
    count: int32 scalar, PyTorch's `state["step"]` (saturates instead of wrapping).
    mu: First moments, PyTorch's `exp_avg`.
    nu: Second moments, PyTorch's `exp_avg_sq`.
    nu_max: PyTorch's `max_exp_avg_sq`; `None` unless `amsgrad`.
  """

  count: jax.Array
  mu: optax.Updates
  nu: optax.Updates
  nu_max: optax.Updates | None


def _decay_factor(r: _xla_exact.Guard, lr: Any, weight_decay: Any) -> jax.Array:
  """float32 of PyTorch's Python-double `1 - lr * weight_decay`."""
  if all(isinstance(x, (int, float, np.floating, np.integer)) for x in (lr, weight_decay)):
    return jnp.asarray(np.float32(1.0 - float(lr) * float(weight_decay)))
  p, e = _double_float.mul(
    r, _double_float.from_number(lr), _double_float.from_number(weight_decay)
  )
  s, t = _double_float.two_sum(r, jnp.ones([], jnp.float32), -p)
  return s + (t - e)


# ---------------------------------------------------------------------------------------------
# One leaf of `torch.optim.adam._single_tensor_adam` (capturable=False, differentiable=False).
# ---------------------------------------------------------------------------------------------


def _torch_step(
  g: jax.Array,
  p: jax.Array | None,
  m: jax.Array,
  v: jax.Array,
  v_max: jax.Array | None,
  *,
  step_size: jax.Array,
  bias_correction2_sqrt: jax.Array,
  decay: jax.Array | None,
  weight_decay: Any,
  one_minus_beta1: np.float32,
  beta2: np.float32,
  one_minus_beta2: np.float32,
  eps: Any,
  maximize: bool,
  fused: bool,
  r: _xla_exact.Guard,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array | None]:
  """Returns `(p - p_new, m, v, v_max)` for one parameter, PyTorch's kernels op for op.

  Each tensor op computes in float32 (PyTorch's opmath for float32, bfloat16 and float16) and
  stores its result in the parameter dtype, as each in-place op does.
  """
  dtype = m.dtype
  f32 = jnp.float32
  store = lambda x: x.astype(dtype).astype(f32)  # noqa: E731 - one tensor op's result
  # The multiply-adds that PyTorch's vectorized CPU kernels (AVX2, AVX-512) fuse:
  # lerp is `vec::fmadd(w, end - self, self)`, add(alpha) is `fmadd(other, alpha, self)`, and
  # addcmul is `self + (value*t1)*t2`, which GCC contracts. ATEN_CPU_CAPABILITY=default rounds.
  if fused:
    madd = functools.partial(_double_float.fma, r)
  else:
    madd = lambda a, b, c: r(a * b) + c  # noqa: E731
  g = g.astype(f32)
  m, v = m.astype(f32), v.astype(f32)
  if maximize:
    g = -g
  p0 = None if p is None else p.astype(f32)
  p_cur = p0
  if decay is not None:  # param.mul_(1 - lr * weight_decay): a float32 multiply.
    p_cur = store(r(p0 * decay))
  elif p0 is not None:  # grad = grad.add(param, alpha=weight_decay)
    decayed = store(madd(p0, jnp.asarray(weight_decay, f32), g))
    g = (
      decayed
      if not isinstance(weight_decay, jax.Array)
      else jnp.where(weight_decay != 0, decayed, g)
    )
  # exp_avg.lerp_(grad, 1 - beta1): `self + w*(end - self)` for |w| < 0.5, else
  # `end - (end - self)*(1 - w)`; both are one fused multiply-add on float32 w.
  w = jnp.asarray(one_minus_beta1, f32)
  if one_minus_beta1 < 0.5:
    m = store(madd(w, g - m, m))
  else:
    m = store(madd(-(jnp.ones([], f32) - w), g - m, g))
  # exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
  v = store(r(v * jnp.asarray(beta2, f32)))
  v = store(madd(r(jnp.asarray(one_minus_beta2, f32) * g), g, v))
  v_used = v
  if v_max is not None:  # torch.maximum(max_exp_avg_sq, exp_avg_sq, out=max_exp_avg_sq)
    v_max = store(jnp.maximum(v_max.astype(f32), v))
    v_used = v_max
  # denom = (v.sqrt() / bias_correction2_sqrt).add_(eps); each op stored in the dtype.
  root = store(jnp.sqrt(v_used))
  denom = store(
    store(_xla_exact.no_reciprocal_divide(root, bias_correction2_sqrt)) + jnp.asarray(eps, f32)
  )
  # param.addcdiv_(exp_avg, denom, value=-step_size): `self + (value*t1)/t2`.
  delta = (-step_size * m) / denom
  if decay is None:
    # The update is the addcdiv term itself: `p - update` is PyTorch's `p + delta`, bit for bit.
    out = -store(delta)
  else:
    # PyTorch rounds twice (the decay, then the addcdiv), optax.apply_updates once. The update
    # p - p_new is exact when p_new is within a factor 2 of p (Sterbenz), and then
    # `p - update` is PyTorch's p_new. Otherwise (a parameter crossing zero) no float32 update
    # may reproduce it, and the result lands within an ulp of p, not of p_new. Kept rounded
    # (`r`) so XLA cannot cancel it against the user's `p + update`.
    out = r(p0 - store(p_cur + delta))
  cast = lambda x: None if x is None else x.astype(dtype)  # noqa: E731
  return cast(out), cast(m), cast(v), cast(v_max)


def _static_beta(name: str, value: Any) -> float:
  """The exact double of a beta; PyTorch's bias corrections need it on the host."""
  if isinstance(value, jax.core.Tracer):
    raise ValueError(
      f"{name} must be a concrete number: PyTorch raises the exact double {name} to the step "
      f"count, which adamjax tabulates on the host (got a traced value {value!r}). "
      f"optax.inject_hyperparams leaves the `betas` tuple static, so it is not affected."
    )
  _common.check_hyperparameter(name, value, low=0.0, high=1.0, scalar=True)
  return float(np.asarray(value, np.float64))


def scale_by_torch_adam(
  lr: optax.ScalarOrSchedule = 0.001,
  betas: tuple[Any, Any] = (0.9, 0.999),
  eps: Any = 1e-8,
  weight_decay: Any = 0.0,
  amsgrad: bool = False,
  *,
  maximize: bool = False,
  decoupled_weight_decay: bool = False,
  fused_multiply_add: bool = True,
) -> optax.GradientTransformation:
  r"""Rescales updates as `torch.optim.Adam`'s single-tensor step, learning rate included.

  .. math::
    g_t \leftarrow g_t + \lambda\theta_{t-1}\ \text{(coupled)},\quad
    \theta' = \theta_{t-1}(1-\eta\lambda)\ \text{(decoupled)},\\
    m_t = m_{t-1} + (1-\beta_1)(g_t - m_{t-1}),\quad
    v_t = \beta_2 v_{t-1} + (1-\beta_2)g_t^2,\\
    \theta_t = \theta' - \frac{\eta}{1-\beta_1^t}\cdot
    \frac{m_t}{\sqrt{v_t}/\sqrt{1-\beta_2^t} + \varepsilon},

  with :math:`v_t` replaced by its running maximum under `amsgrad`. Returns the positive step
  :math:`\theta_{t-1} - \theta_t`; :func:`torch_adam` negates it.

  Args:
    lr: A float or a schedule evaluated at the 0-based `count` (PyTorch's LR schedulers set the
      lr before step `count + 1`). A schedule's or `inject_hyperparams`' lr is a float32 value;
      results then match PyTorch given that float32 value as its lr.
    betas: `(beta1, beta2)`, concrete numbers: they enter the bias corrections as exact doubles.
    eps: Added to :math:`\sqrt{\hat v_t}` after bias correction (optax's `eps`, not Keras's).
    weight_decay: L2 coefficient (coupled, added to the gradient) or, with
      `decoupled_weight_decay`, AdamW's decay :math:`\theta(1-\eta\lambda)`. Needs `params`.
    amsgrad: Keep PyTorch's `max_exp_avg_sq`, the running maximum of the raw :math:`v_t`.
    maximize: Ascend: the gradient is negated first.
    decoupled_weight_decay: AdamW's decay (PyTorch's flag of the same name).
    fused_multiply_add: True (default) rounds the three multiply-adds that PyTorch's AVX2 /
      AVX-512 CPU kernels fuse (lerp, addcmul, add with alpha) once, as an FMA, emulated exactly
      in float32 so results are the same jitted or not. False rounds each product, as PyTorch
      built or run without vector FMA (`ATEN_CPU_CAPABILITY=default`) does.

  Returns:
    An `optax.GradientTransformation` with state :class:`ScaleByTorchAdamState`.

  References:
    `torch/optim/adam.py` (`_single_tensor_adam`); Kingma & Ba 2015; Loshchilov & Hutter 2019.
  """
  # PyTorch's own refusals ("Invalid learning rate", ...): negative lr, eps, weight_decay, betas
  # outside [0, 1); and it takes numbers, so arrays must be 0-d.
  _common.check_hyperparameter("lr", lr, low=0.0, allow_schedule=True, scalar=True)
  if not isinstance(betas, (tuple, list)) or len(betas) != 2:
    raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
  beta1, beta2 = _static_beta("betas[0]", betas[0]), _static_beta("betas[1]", betas[1])
  _common.check_hyperparameter("eps", eps, low=0.0, scalar=True)
  _common.check_hyperparameter("weight_decay", weight_decay, low=0.0, scalar=True)
  use_params = isinstance(weight_decay, jax.Array) or float(weight_decay) != 0.0
  # The scalars PyTorch passes as Python doubles, rounded to float32 by its kernels.
  one_minus_beta1 = np.float32(1.0 - beta1)
  one_minus_beta2 = np.float32(1.0 - beta2)

  def init_fn(params):
    return ScaleByTorchAdamState(
      count=jnp.zeros([], jnp.int32),
      mu=optax.tree.zeros_like(params),
      nu=optax.tree.zeros_like(params),
      nu_max=optax.tree.zeros_like(params) if amsgrad else None,
    )

  def update_fn(updates, state, params=None):
    _common.check_updates_match(updates, state.nu)
    if use_params and params is None:
      raise ValueError(
        "torch_adam with weight_decay needs `params` in update(updates, state, params). "
        "A weight_decay given as an array (as optax.inject_hyperparams gives it) counts as "
        "nonzero; list it in inject_hyperparams' static_args to keep a literal 0.0."
      )
    current_lr = _common.resolve(lr, state.count)
    count_inc = _common.safe_increment(state.count)
    step = jnp.minimum(count_inc, _MAX_TORCH_STEP)
    # step_size = lr / (1 - beta1**step); bias_correction2**0.5: float64 in PyTorch.
    r = _xla_exact.make_no_fma(state.count)
    step_size = _double_float.div_to_f32(
      r, _double_float.from_number(current_lr), _double_float.one_minus_power(r, beta1, step)
    )
    bc2_sqrt = _double_float.sqrt_to_f32(r, _double_float.one_minus_power(r, beta2, step))
    decay = (
      _decay_factor(r, current_lr, weight_decay)
      if (use_params and decoupled_weight_decay)
      else None
    )
    leaf = lambda g, p, m, v, vm: _torch_step(  # noqa: E731
      g,
      p,
      m,
      v,
      vm,
      step_size=step_size,
      bias_correction2_sqrt=bc2_sqrt,
      decay=decay,
      weight_decay=weight_decay,
      one_minus_beta1=one_minus_beta1,
      beta2=np.float32(beta2),
      one_minus_beta2=one_minus_beta2,
      eps=eps,
      maximize=maximize,
      fused=fused_multiply_add,
      r=r,
    )
    none_tree = jax.tree.map(lambda _: None, state.nu)
    nu_max = state.nu_max if amsgrad else none_tree
    if use_params:
      _common.check_updates_match(params, state.nu, "the optimizer state (params)")
    out = _common.tree_map_leaves(
      leaf, updates, params if use_params else none_tree, state.mu, state.nu, nu_max
    )
    steps, mu, nu, nu_max = _common.tree_unzip(updates, out, 4)
    return steps, ScaleByTorchAdamState(
      count=count_inc, mu=mu, nu=nu, nu_max=nu_max if amsgrad else None
    )

  return optax.GradientTransformation(init_fn, update_fn)


def torch_adam(
  lr: optax.ScalarOrSchedule = 0.001,
  betas: tuple[Any, Any] = (0.9, 0.999),
  eps: Any = 1e-8,
  weight_decay: Any = 0.0,
  amsgrad: bool = False,
  *,
  foreach: bool | None = None,
  maximize: bool = False,
  decoupled_weight_decay: bool = False,
  fused_multiply_add: bool = True,
) -> optax.GradientTransformation:
  r"""Adam as `torch.optim.Adam`: same constructor, defaults and float32 results.

  Port a PyTorch model by renaming the constructor: `torch.optim.Adam(model.parameters(),
  lr=1e-3)` becomes `adamjax.torch_adam(lr=1e-3)`. Parameters and moments equal PyTorch 2.13's
  single-tensor CPU step (`foreach=False`, the CPU default) bit for bit in the tested cases
  (bounded at 2 ulps per element in the tests) over 1,000 steps of gradients from 1e-8 to 1e2,
  jitted or not, given an IEEE square root (see the warning). Values in float32's subnormal
  range are flushed to zero by XLA and kept by PyTorch.

  What differs from `optax.adam`: `weight_decay` is L2 added to the gradient (coupled), `eps`
  is added after dividing by :math:`\sqrt{1-\beta_2^t}`, the bias corrections are float64
  powers of the exact double betas, and `amsgrad` takes the maximum of the raw second moment.

  .. warning::
    PyTorch's x86 Linux wheels take `Tensor.sqrt` from Intel MKL's vector library, which is
    not correctly rounded: about 17% of float32 roots are 1 ulp off. adamjax uses the IEEE
    square root (PyTorch's result on CUDA and on builds without MKL). Against those MKL roots
    one step agrees to 1 ulp in the parameters and bit for bit in the moments, but a
    trajectory drifts by a few parameter ulps per thousand steps (many ulps for a parameter
    near zero), as two PyTorch builds drift from each other.

  Args:
    lr: Learning rate, a float or a schedule `count -> lr` evaluated at the 0-based step
      (PyTorch's LR schedulers set the lr before each `step()`); see
      :func:`scale_by_torch_adam` for float32 learning rates.
    betas: `(beta1, beta2)`, concrete numbers.
    eps: Added to the bias-corrected root of the second moment.
    weight_decay: Coupled L2 coefficient (`decoupled_weight_decay=False`, PyTorch's default),
      or AdamW's decay. `update` then needs `params`.
    amsgrad: Use AMSGrad (PyTorch's `max_exp_avg_sq`).
    foreach: Accepted for signature compatibility. On CPU PyTorch's foreach path computes the
      same float32 values as its single-tensor path (tested); it has no effect here.
      (`capturable`, `differentiable` and `fused` change PyTorch's arithmetic and are not
      accepted.)
    maximize: Maximize the objective (negate the gradient).
    decoupled_weight_decay: As PyTorch's flag: True is :func:`torch_adamw`.
    fused_multiply_add: See :func:`scale_by_torch_adam`. The default rounds as PyTorch's AVX2 /
      AVX-512 CPU kernels do (x86 since 2013); False as its non-vectorized kernels do.

  Returns:
    An `optax.GradientTransformation`: :func:`scale_by_torch_adam` followed by a sign flip.
    `optax.tree_utils.tree_get(state, "count")` is PyTorch's `state["step"]`.

  Example:
    >>> import adamjax, jax.numpy as jnp, optax
    >>> tx = adamjax.torch_adam(lr=0.1)         # torch.optim.Adam(params, lr=0.1)
    >>> params = {"w": jnp.array([1.0, -2.0])}
    >>> state = tx.init(params)
    >>> updates, state = tx.update({"w": jnp.array([0.5, -0.25])}, state, params)
    >>> print(optax.apply_updates(params, updates)["w"])   # PyTorch prints the same bits
    [ 0.90000004 -1.9       ]
    >>> int(optax.tree_utils.tree_get(state, "count"))
    1

  References:
    `torch.optim.Adam`, `torch/optim/adam.py`; Kingma & Ba 2015, Algorithm 1.
  """
  del foreach
  return optax.chain(
    scale_by_torch_adam(
      lr,
      betas,
      eps,
      weight_decay,
      amsgrad,
      maximize=maximize,
      decoupled_weight_decay=decoupled_weight_decay,
      fused_multiply_add=fused_multiply_add,
    ),
    optax.scale(-1.0),
  )


def torch_adamw(
  lr: optax.ScalarOrSchedule = 0.001,
  betas: tuple[Any, Any] = (0.9, 0.999),
  eps: Any = 1e-8,
  weight_decay: Any = 0.01,
  amsgrad: bool = False,
  *,
  maximize: bool = False,
  foreach: bool | None = None,
  fused_multiply_add: bool = True,
) -> optax.GradientTransformation:
  r"""AdamW as `torch.optim.AdamW`: decoupled decay :math:`\theta(1-\eta\lambda)` first.

  :func:`torch_adam` with `decoupled_weight_decay=True` and PyTorch's AdamW default
  `weight_decay=0.01`. Each step multiplies the parameters by the float32 rounding of the
  double `1 - lr * weight_decay`, then takes the Adam step; the decay never enters the moments.

  .. warning::
    The decay is scaled by the learning rate, as in optax's `adamw` and Keras, not by the
    schedule multiplier alone as in Loshchilov & Hutter's paper; and `weight_decay=0.01` is
    not Keras AdamW's 0.004. PyTorch rounds twice per step (the decay, then the Adam step) and
    an optax update is added once: the result is PyTorch's bit for bit whenever the new
    parameter is within a factor 2 of the old one, but a step that crosses zero can land an
    ulp of the old parameter away (no float32 update reproduces it), after which the two
    trajectories drift as two float32 programs do. See :func:`torch_adam` about PyTorch's MKL
    square root.

  Args:
    lr: Learning rate, a float or a schedule evaluated at the 0-based step.
    betas: `(beta1, beta2)`, concrete numbers.
    eps: Added to the bias-corrected root of the second moment.
    weight_decay: Decoupled decay coefficient; `update` needs `params`.
    amsgrad: Use AMSGrad.
    maximize: Maximize the objective.
    foreach: Accepted for signature compatibility; see :func:`torch_adam`.
    fused_multiply_add: See :func:`scale_by_torch_adam`.

  Returns:
    An `optax.GradientTransformation`, state :class:`ScaleByTorchAdamState` inside a chain.

  Example:
    >>> import adamjax, jax.numpy as jnp, optax
    >>> tx = adamjax.torch_adamw(lr=0.1, weight_decay=0.5)
    >>> params = jnp.array([2.0])
    >>> updates, state = tx.update(jnp.array([0.0]), tx.init(params), params)
    >>> print(optax.apply_updates(params, updates))   # 2 * (1 - 0.1 * 0.5), no Adam step
    [1.9]

  References:
    `torch.optim.AdamW`, `torch/optim/adamw.py`; Loshchilov & Hutter 2019.
  """
  return torch_adam(
    lr,
    betas,
    eps,
    weight_decay,
    amsgrad,
    foreach=foreach,
    maximize=maximize,
    decoupled_weight_decay=True,
    fused_multiply_add=fused_multiply_add,
  )
