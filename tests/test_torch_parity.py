"""torch_adam / torch_adamw against the real torch.optim.Adam / AdamW (PyTorch 2.13, CPU).

How it runs: PyTorch's single-tensor path (`foreach=False`, the CPU default) in this process,
over 1,000 steps of gradients whose magnitudes span 1e-8 .. 1e2 on five shapes: four small ones
(PyTorch's scalar loop tails) and (5, 33), whose 165 elements also go through its AVX-512 / AVX2
vector loops. After every step the parameters, `exp_avg`, `exp_avg_sq` and `max_exp_avg_sq`
are compared per element, in float32 ulps.

Two facts about PyTorch's CPU kernels decide the numerics (measured here; see
`test_torch_cpu_kernels_as_modelled`):
- `lerp_`, `addcmul_` and `add(alpha=)` are fused multiply-adds (one rounding) in the AVX2 and
  AVX-512 kernels and separately rounded with `ATEN_CPU_CAPABILITY=default`. adamjax emulates the
  FMA exactly (`fused_multiply_add=True`, default) or rounds products (`False`).
- `Tensor.sqrt` on float32 comes from Intel MKL's vector library on x86 Linux wheels and is not
  correctly rounded (about 17% of roots 1 ulp off). adamjax uses the IEEE root, PyTorch's result
  on CUDA and on builds without MKL. The trajectory tests therefore run PyTorch with its float32
  `aten.sqrt` routed to numpy's IEEE root by a `TorchDispatchMode`, every other op being
  PyTorch's own kernel; against stock MKL roots, one step from PyTorch's own state is compared.

Bounds (against PyTorch with IEEE roots): at most 2 ulps per element; measured 0 for parameters
and moments in every Adam configuration, jitted and eager. AdamW: moments 0; parameters 0 until
a step crosses zero, where PyTorch's two roundings (decay, then step) cannot be reproduced by
one optax update, so one step from PyTorch's own state is checked as well (exact except at
crossings, within an ulp of the step there). Against stock MKL roots, one step from PyTorch's
state: moments 0, parameters within 3 ulps of the step and bit for bit in >99% of cases.
"""

import functools
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adamjax
from adamjax import _double_float, _torch_adam, _xla_exact
from adamjax._torch_adam import ScaleByTorchAdamState, scale_by_torch_adam, torch_adam, torch_adamw
from adamjax.testing import make_gradient_sequence, make_params, max_ulps, run_optax, ulp_distance

torch = pytest.importorskip("torch")
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

SHAPES = {"bias": (7,), "kernel": (3, 5), "conv": (2, 3, 4), "scale": (), "wide": (5, 33)}
STEPS = 1000
ULP_BOUND = 2

# name -> torch.optim.Adam keyword arguments ("adamw": use AdamW).
CONFIGS = {
  "default": {},
  "weight_decay": {"weight_decay": 0.01},  # Adam's coupled L2
  "amsgrad": {"amsgrad": True},
  "maximize": {"maximize": True},
  "custom": {"lr": 0.01, "betas": (0.8, 0.99), "eps": 1e-6},
  "combined": {
    "lr": 3e-3,
    "betas": (0.95, 0.9999),
    "weight_decay": 0.1,
    "amsgrad": True,
    "maximize": True,
  },
  "adamw": {"adamw": True},
  "adamw_amsgrad": {"adamw": True, "lr": 0.01, "weight_decay": 0.1, "amsgrad": True},
}
ADAM_CONFIGS = sorted(k for k in CONFIGS if not CONFIGS[k].get("adamw"))
ADAMW_CONFIGS = sorted(k for k in CONFIGS if CONFIGS[k].get("adamw"))


class IEEESqrt(TorchDispatchMode):
  """Routes float32 `aten.sqrt` to numpy's correctly rounded root; every other op is PyTorch's."""

  def __init__(self):
    super().__init__()
    self.calls = 0

  def __torch_dispatch__(self, func, types, args=(), kwargs=None):
    if func is torch.ops.aten.sqrt.default and args[0].dtype == torch.float32:
      self.calls += 1
      return torch.from_numpy(np.asarray(np.sqrt(args[0].numpy())))
    return func(*args, **(kwargs or {}))


@functools.cache
def _inputs(seed=0):
  return make_params(SHAPES, seed), make_gradient_sequence(SHAPES, STEPS, seed + 1)


def run_torch(config, params, grads, *, ieee_sqrt=True, lr_lambda=None):
  """Steps torch.optim.Adam/AdamW(foreach=False) over `grads`; returns per-step records.

  Returns `{"params"|"mu"|"nu"[|"nu_max"]: {name: [steps, ...]}}` (float32), recorded after
  every step, named as adamjax's state fields.
  """
  config = dict(config)
  cls = torch.optim.AdamW if config.pop("adamw", False) else torch.optim.Adam
  names = sorted(params)
  tensors = {k: torch.tensor(params[k]) for k in names}
  opt = cls([tensors[k] for k in names], foreach=False, **config)
  sched = None if lr_lambda is None else torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)
  slots = {"mu": "exp_avg", "nu": "exp_avg_sq"}
  if config.get("amsgrad"):
    slots["nu_max"] = "max_exp_avg_sq"
  records = {f: {k: [] for k in names} for f in ["params", *slots]}
  mode = IEEESqrt()
  steps = len(grads[names[0]])
  for t in range(steps):
    for k in names:
      tensors[k].grad = torch.tensor(grads[k][t])
    if ieee_sqrt:
      with mode:
        opt.step()
    else:
      opt.step()
    if sched is not None:
      sched.step()
    for k in names:
      records["params"][k].append(tensors[k].detach().numpy().copy())
      for field, slot in slots.items():
        records[field][k].append(opt.state[tensors[k]][slot].numpy().copy())
  assert not ieee_sqrt or mode.calls == steps * len(names)
  return {f: {k: np.stack(v) for k, v in r.items()} for f, r in records.items()}


@functools.cache
def _torch(config_name, ieee_sqrt=True):
  params, grads = _inputs()
  return run_torch(CONFIGS[config_name], params, grads, ieee_sqrt=ieee_sqrt)


def _tx(config, **kwargs):
  config = dict(config)
  if config.pop("adamw", False):
    return torch_adamw(**config, **kwargs)
  return torch_adam(**config, **kwargs)


def _ours(tx, amsgrad=False, jit=True, steps=STEPS):
  params, grads = _inputs()
  grads = {k: v[:steps] for k, v in grads.items()}
  fields = ("mu", "nu", "nu_max") if amsgrad else ("mu", "nu")
  return run_optax(tx, params, grads, jit=jit, fields=fields)


def _ulps(ours, ref):
  """Max ulps per quantity `ref` records (params, mu, ...), over every step and element."""
  return {f: max_ulps({k: ours[f][k] for k in ref[f]}, ref[f]) for f in ref}


def _crossings(ref_params, params0):
  """Where PyTorch's step leaves p_new outside [p/2, 2p] (a sign change, or a big relative
  move): [steps, ...] bools per name.

  AdamW rounds `p * (1 - lr*wd)` and then adds the Adam step; an optax update is added once.
  `p + (p_new - p)` is exact inside that range (Sterbenz), so the update reproduces PyTorch's
  bits; outside it (a parameter crossing zero) no float32 update may, and p + update lands
  within an ulp of max(|p|, |p_new|, |p_new - p|) of PyTorch's p_new.
  """
  out = {}
  for k, new in ref_params.items():
    prev = np.concatenate([params0[k][None], new[:-1]]).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
      ratio = new.astype(np.float64) / prev
    out[k] = ~((ratio >= 0.5) & (ratio <= 2.0))
  return out


def _step_scale(prev, new):
  """float32 ulp of the largest of |p|, |p_new| and |p_new - p|: what one step can be off by."""
  prev, new = prev.astype(np.float64), new.astype(np.float64)
  return np.spacing(
    np.maximum.reduce([np.abs(prev), np.abs(new), np.abs(new - prev)]).astype(np.float32)
  ).astype(np.float64)


def _assert_adamw_params_exact_until_crossing(ours, ref, params0):
  """Bit for bit at every step of every element until its first zero-crossing step."""
  covered = []
  for k, crossing in _crossings(ref["params"], params0).items():
    before = np.cumsum(crossing, axis=0) == 0  # no crossing at this step or before
    dist = ulp_distance(ours["params"][k], ref["params"][k])
    assert int(dist[before].max(initial=0)) == 0, k
    covered.append(before.ravel())
  assert np.mean(np.concatenate(covered)) > 0.5  # most element-steps are covered


# ---------------------------------------------------------------------------------------------
# The float32 building blocks: PyTorch's float64 scalars and its FMAs.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
  "betas,lr",
  [
    ((0.9, 0.999), 1e-3),
    ((0.8, 0.99), 0.01),
    ((0.5, 0.9999), 3e-4),
    ((0.99, 0.9), 1.0),
    ((0.0, 0.999999), 0.1),
  ],
)
def test_bias_corrections_equal_float64_rounded_for_every_step_to_100000(betas, lr):
  """PyTorch: `step_size = lr / (1 - beta1**step)`, `(1 - beta2**step)**0.5`, in float64."""
  b1, b2 = betas
  steps = np.arange(1, 100_001)

  def scalars(t):
    r = _xla_exact.make_no_fma(t - 1)
    return (
      _double_float.div_to_f32(
        r, _double_float.from_number(lr), _double_float.one_minus_power(r, b1, t)
      ),
      _double_float.sqrt_to_f32(r, _double_float.one_minus_power(r, b2, t)),
    )

  ours = jax.jit(jax.vmap(scalars))(jnp.asarray(steps, jnp.int32))
  t = steps.astype(np.float64)
  step_size = (lr / (1.0 - b1**t)).astype(np.float32)
  bc2_sqrt = ((1.0 - b2**t) ** 0.5).astype(np.float32)
  np.testing.assert_array_equal(np.asarray(ours[0]), step_size)
  np.testing.assert_array_equal(np.asarray(ours[1]), bc2_sqrt)
  # Eagerly, op by op, at a few steps including PyTorch's float32 step ceiling 2**24.
  for step in (1, 2, 3, 10, 999, 65_536, 2**24):
    eager = scalars(jnp.int32(step))
    assert float(eager[0]) == np.float32(lr / (1.0 - b1 ** float(step)))
    assert float(eager[1]) == np.float32((1.0 - b2 ** float(step)) ** 0.5)


def test_decay_factor_equals_float64_rounded():
  """AdamW's `1 - lr * weight_decay` (a Python double) for float32 lr / weight decay arrays."""
  rng = np.random.default_rng(0)
  lrs = (10.0 ** rng.uniform(-6, 0, 2000)).astype(np.float32)
  wds = (10.0 ** rng.uniform(-5, 0, 2000)).astype(np.float32)
  rounder = _xla_exact.make_no_fma(jnp.zeros([], jnp.int32))
  ours = jax.jit(
    jax.vmap(lambda lr, wd, count: _torch_adam._decay_factor(_xla_exact.make_no_fma(count), lr, wd))
  )(lrs, wds, jnp.zeros(lrs.shape, jnp.int32))
  expected = (1.0 - lrs.astype(np.float64) * wds.astype(np.float64)).astype(np.float32)
  np.testing.assert_array_equal(np.asarray(ours), expected)
  assert float(_torch_adam._decay_factor(rounder, 1e-3, 0.01)) == np.float32(1.0 - 1e-3 * 0.01)


@pytest.mark.parametrize("jit", [True, False], ids=["jit", "eager"])
def test_fma_emulation_rounds_once(jit):
  rng = np.random.default_rng(0)
  n = 200_000

  def rand(lo, hi):
    return (np.where(rng.random(n) < 0.5, -1.0, 1.0) * 2.0 ** rng.uniform(lo, hi, n)).astype(
      np.float32
    )

  a, b = rand(-40, 40), rand(-40, 40)
  a[: n // 10] = np.float32(2 - 2**-23)  # all-ones significands stress the split
  a[:4] = b[:4] = np.float32(1 + 2**-12)  # a*b = 1 + 2**-11 + 2**-24: a tie when c = 0
  product = a.astype(np.float64) * b  # exact in float64
  c = np.where(
    rng.random(n) < 0.5, (-product * (1 + rng.normal(0, 1e-6, n))).astype(np.float32), rand(-60, 60)
  )
  c[:4] = [0.0, 2**-24, -(2**-24), 1.0]
  exact_sum = product + c
  exact = (exact_sum - c == product) & (exact_sum - product == c)  # float64 sum exact

  def fma(a, b, c, count):
    return _double_float.fma(_xla_exact.make_no_fma(count), a, b, c)

  fma = jax.jit(fma) if jit else fma
  got = np.asarray(fma(jnp.asarray(a), jnp.asarray(b), jnp.asarray(c), jnp.int32(0)))
  assert exact[:4].all() and exact.mean() > 0.5
  np.testing.assert_array_equal(got[exact], exact_sum.astype(np.float32)[exact])
  assert got[0] == np.float32(1 + 2**-11)  # the tie 1 + 2**-11 + 2**-24 rounds to even


def test_torch_cpu_kernels_as_modelled():
  """The kernel facts the preset relies on, checked on this machine's PyTorch."""
  rng = np.random.default_rng(0)
  x = (np.where(rng.random(1000) < 0.5, -1.0, 1.0) * 10.0 ** rng.uniform(-8, 2, 1000)).astype(
    np.float32
  )
  y, v = x[::-1].copy(), np.abs(x) * 1e-3
  w = np.float32(1 - 0.9)

  def fma(a, b, c):  # the float64 sum of a float32 product is exact for these magnitudes
    return (np.float64(a) * np.asarray(b, np.float64) + c).astype(np.float32)

  t = torch.from_numpy
  cap = torch.backends.cpu.get_cpu_capability()
  if cap in ("AVX2", "AVX512"):
    np.testing.assert_array_equal(t(x.copy()).lerp_(t(y), 0.1).numpy(), fma(w, y - x, x))
    np.testing.assert_array_equal(
      t(v.copy()).addcmul_(t(x), t(x), value=1 - 0.999).numpy(),
      fma(np.float32(1 - 0.999) * x, x, v),
    )
  # addcdiv is `self + (value * t1) / t2` with value rounded to float32.
  np.testing.assert_array_equal(
    t(x.copy()).addcdiv_(t(y), t(v), value=-0.0123).numpy(), x + (np.float32(-0.0123) * y) / v
  )
  # Division by a Python double divides by its float32 rounding.
  np.testing.assert_array_equal((t(v) / 0.0316227766).numpy(), v / np.float32(0.0316227766))
  # MKL's root is not IEEE on x86 wheels (this documents it; builds without MKL are exact).
  if torch.backends.mkl.is_available():
    assert np.mean(t(v).sqrt().numpy() != np.sqrt(v)) > 0.05


# ---------------------------------------------------------------------------------------------
# Trajectories against torch.optim.Adam / AdamW.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("config", ADAM_CONFIGS)
def test_torch_adam_matches_torch(config):
  amsgrad = CONFIGS[config].get("amsgrad", False)
  ulps = _ulps(_ours(_tx(CONFIGS[config]), amsgrad), _torch(config))
  assert max(ulps.values()) <= ULP_BOUND, ulps
  assert ulps == dict.fromkeys(ulps, 0), f"within the bound but not bit for bit: {ulps}"


@pytest.mark.parametrize("config", ADAMW_CONFIGS)
def test_torch_adamw_matches_torch(config):
  """Moments bit for bit; parameters bit for bit until a step crosses zero (see `_crossings`);
  after that the trajectories are two float32 computations an ulp apart, and one step from
  PyTorch's own state is checked instead (`test_one_step_from_torch_state`)."""
  amsgrad = CONFIGS[config].get("amsgrad", False)
  ours, ref = _ours(_tx(CONFIGS[config]), amsgrad), _torch(config)
  ulps = _ulps(ours, ref)
  assert {f: u for f, u in ulps.items() if f != "params"} == dict.fromkeys(
    [f for f in ulps if f != "params"], 0
  )
  _assert_adamw_params_exact_until_crossing(ours, ref, _inputs()[0])


@pytest.mark.parametrize("config", ["combined", "adamw_amsgrad"])
def test_eager_equals_jit_and_torch(config):
  """Op by op (no XLA fusion at all) gives the same bits as the jitted scan, and as PyTorch.

  Two of the shapes (a scalar and the vector-loop one) and 30 steps keep the eager loop short;
  each element's trajectory is independent of the others.
  """
  steps, names = 30, ("scale", "wide")
  amsgrad = CONFIGS[config].get("amsgrad", False)
  params, grads = _inputs()
  params = {k: params[k] for k in names}
  grads = {k: grads[k][:steps] for k in names}
  fields = ("mu", "nu", "nu_max") if amsgrad else ("mu", "nu")
  eager = run_optax(_tx(CONFIGS[config]), params, grads, jit=False, fields=fields)
  jitted = run_optax(_tx(CONFIGS[config]), params, grads, jit=True, fields=fields)
  assert _ulps(eager, jitted) == dict.fromkeys(jitted, 0)
  ref = {
    f: {k: v[:steps] for k, v in per.items() if k in names} for f, per in _torch(config).items()
  }
  if CONFIGS[config].get("adamw"):
    slots = {f: u for f, u in _ulps(eager, ref).items() if f != "params"}
    assert set(slots) == set(fields) and slots == dict.fromkeys(fields, 0)
    _assert_adamw_params_exact_until_crossing(eager, ref, params)
  else:
    assert _ulps(eager, ref) == dict.fromkeys(jitted, 0)


def _one_step_from(ref, config):
  """adamjax's step from PyTorch's recorded state before each step (vmapped over the steps)."""
  params0, grads = _inputs()
  cfg = dict(CONFIGS[config])
  if cfg.pop("adamw", False):
    cfg = {"weight_decay": 0.01, "decoupled_weight_decay": True} | cfg  # AdamW's defaults
  tx = scale_by_torch_adam(**cfg)
  # PyTorch's state before each step: the initial parameters and zero slots, then its records.
  first = {"params": params0} | {
    f: {k: np.zeros_like(params0[k]) for k in SHAPES} for f in ref if f != "params"
  }
  prev = {f: {k: np.concatenate([first[f][k][None], ref[f][k][:-1]]) for k in SHAPES} for f in ref}
  state = ScaleByTorchAdamState(
    count=jnp.arange(STEPS, dtype=jnp.int32),
    mu=prev["mu"],
    nu=prev["nu"],
    nu_max=prev.get("nu_max"),
  )

  def one_step(g, state, p):
    step, state = tx.update(g, state, p)
    return jax.tree.map(lambda a, b: a - b, p, step), state

  new_params, new_state = jax.jit(jax.vmap(one_step))(grads, state, prev["params"])
  for field in ref:
    if field != "params":
      for k in SHAPES:
        np.testing.assert_array_equal(np.asarray(getattr(new_state, field)[k]), ref[field][k])
  return {k: np.asarray(v) for k, v in new_params.items()}, prev["params"]


@pytest.mark.parametrize("config", ["combined", "adamw", "adamw_amsgrad"])
def test_one_step_from_torch_state(config):
  """From PyTorch's state before each of the 1,000 steps, one step gives its moments and its
  parameters bit for bit, except AdamW's zero-crossing steps: there within an ulp of p."""
  ref = _torch(config)
  new_params, prev = _one_step_from(ref, config)
  crossings = _crossings(ref["params"], _inputs()[0])
  for k in SHAPES:
    exact = ~crossings[k] if CONFIGS[config].get("adamw") else np.ones_like(crossings[k])
    np.testing.assert_array_equal(new_params[k][exact], ref["params"][k][exact])
    err = np.abs(new_params[k].astype(np.float64) - ref["params"][k])
    assert np.all(err <= _step_scale(prev[k], ref["params"][k])), k


@pytest.mark.parametrize("config", ["default", "weight_decay", "combined", "adamw_amsgrad"])
def test_one_step_from_stock_torch_state(config):
  """Against stock PyTorch (MKL's root, 1 ulp off in 17% of elements): from its state before
  each step, one step gives the moments bit for bit and the parameters within 3 ulps of the
  largest of |p|, |p_new| and the step (a root 1 ulp off moves the step by up to 2 of its
  ulps, and the final rounding may then differ by one); bit for bit in >99% of element-steps."""
  ref = _torch(config, ieee_sqrt=False)
  new_params, prev = _one_step_from(ref, config)
  same = []
  for k in SHAPES:
    theirs = ref["params"][k]
    err = np.abs(new_params[k].astype(np.float64) - theirs)
    assert np.all(err <= 3 * _step_scale(prev[k], theirs)), k
    same.append((new_params[k] == theirs).ravel())
  assert np.mean(np.concatenate(same)) > 0.99


def _torch_worker(out_path):
  """Subprocess body: run_torch with ATEN_CPU_CAPABILITY set by the parent (no vector FMA)."""
  params, grads = _inputs()
  out = {}
  for field, per_name in run_torch(CONFIGS["weight_decay"], params, grads).items():
    for k, v in per_name.items():
      out[f"{field}/{k}"] = v
  np.savez(out_path, capability=torch.backends.cpu.get_cpu_capability(), **out)


def test_fused_multiply_add_false_matches_torch_without_vector_fma(tmp_path):
  """PyTorch with ATEN_CPU_CAPABILITY=default (set before import, so in a subprocess) rounds
  every product; `fused_multiply_add=False` reproduces it."""
  repo = pathlib.Path(__file__).resolve().parents[1]
  env = dict(
    os.environ,
    ATEN_CPU_CAPABILITY="default",
    PYTHONPATH=os.pathsep.join([str(repo), str(repo / "tests")]),
  )
  out = tmp_path / "torch_default.npz"
  subprocess.run([sys.executable, __file__, str(out)], check=True, env=env, cwd=repo, timeout=300)
  saved = np.load(out)
  assert str(saved["capability"]) == "DEFAULT"
  ref = {"params": {}, "mu": {}, "nu": {}}
  for key in saved.files:
    if "/" in key:
      field, k = key.split("/")
      ref[field][k] = saved[key]
  # Coupled weight decay: all three multiply-adds (add with alpha, lerp, addcmul) are used.
  ulps = _ulps(_ours(_tx(CONFIGS["weight_decay"], fused_multiply_add=False)), ref)
  assert ulps == dict.fromkeys(ref, 0), ulps
  # The flag matters: FMAs are not what this PyTorch computes.
  assert _ulps(_ours(_tx(CONFIGS["weight_decay"])), ref)["mu"] > 0


@pytest.mark.parametrize("other", ["optax.adam", "adamjax.adam", "torch_adam(fma=False)"])
def test_negative_control_other_adams_miss_the_bound(other):
  tx = {
    "optax.adam": optax.adam(1e-3, b1=0.9, b2=0.999, eps=1e-8),
    "adamjax.adam": adamjax.adam(1e-3, b1=0.9, b2=0.999, eps=1e-8),
    "torch_adam(fma=False)": torch_adam(fused_multiply_add=False),
  }[other]
  ulps = _ulps(_ours(tx), _torch("default"))
  assert ulps["params"] > 10 * ULP_BOUND, ulps


def test_schedule_matches_torch_lambda_lr():
  """A schedule is evaluated at the 0-based count, as LambdaLR sets lr before each step."""
  # Piecewise constant, so that PyTorch gets the very float32 values the jitted scan computes.
  schedule = optax.piecewise_constant_schedule(1e-2, {20: 0.5, 60: 0.1, 150: 3.0})
  params, grads = _inputs()
  grads = {k: v[:200] for k, v in grads.items()}
  ref = run_torch(
    {"lr": 1.0, "weight_decay": 0.01}, params, grads, lr_lambda=lambda step: float(schedule(step))
  )
  ours = run_optax(torch_adam(schedule, weight_decay=0.01), params, grads)
  assert _ulps(ours, ref) == dict.fromkeys(ref, 0)


def test_inject_hyperparams_matches_torch_given_float32_values():
  params, grads = _inputs()
  grads = {k: v[:200] for k, v in grads.items()}
  tx = optax.inject_hyperparams(torch_adamw)(lr=3e-3, weight_decay=0.05, eps=1e-7)
  f32 = lambda x: float(np.float32(x))  # noqa: E731 - injected values are float32
  ref = run_torch(
    {"adamw": True, "lr": f32(3e-3), "weight_decay": f32(0.05), "eps": 1e-7}, params, grads
  )
  ours = run_optax(tx, params, grads)
  assert _ulps(ours, ref)["nu"] == 0
  _assert_adamw_params_exact_until_crossing(ours, ref, params)


# ---------------------------------------------------------------------------------------------
# Contract: what every adamjax transformation promises an optax user.
# ---------------------------------------------------------------------------------------------


TRANSFORMS = {
  "torch_adam": lambda lr: torch_adam(lr),
  "torch_adam_amsgrad_wd": lambda lr: torch_adam(lr, weight_decay=1e-3, amsgrad=True),
  "torch_adam_no_fma": lambda lr: torch_adam(lr, fused_multiply_add=False),
  "torch_adamw": lambda lr: torch_adamw(lr, weight_decay=1e-4),
  "scale_by_torch_adam": lambda lr: optax.chain(scale_by_torch_adam(lr), optax.scale(-1.0)),
}
names = pytest.mark.parametrize("name", sorted(TRANSFORMS))


def _params(dtype=jnp.float32):
  return {
    "dense": {
      "kernel": jnp.linspace(-1.0, 1.0, 12, dtype=dtype).reshape(3, 4),
      "bias": jnp.zeros((4,), dtype),
    },
    "scale": jnp.asarray(0.5, dtype),
  }


def _loss(params):
  return sum(jnp.sum((leaf.astype(jnp.float32) - 0.25) ** 2) for leaf in jax.tree.leaves(params))


@pytest.mark.parametrize(
  "name,dtype",
  [(name, jnp.float32) for name in sorted(TRANSFORMS)]
  + [("torch_adam", jnp.bfloat16), ("torch_adamw", jnp.float16)],
)
def test_jitted_step_keeps_shapes_dtypes_and_finite(name, dtype):
  tx = TRANSFORMS[name](1e-2)
  params = _params(dtype)
  traces = []

  @jax.jit
  def step(params, state):
    traces.append(1)
    grads = jax.tree.map(lambda g, p: g.astype(p.dtype), jax.grad(_loss)(params), params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  state = jax.jit(tx.init)(params)
  new_params = params
  for _ in range(3):
    new_params, state = step(new_params, state)
  assert len(traces) == 1 and step._cache_size() == 1  # no recompilation
  for leaf, ref in zip(jax.tree.leaves(new_params), jax.tree.leaves(params), strict=True):
    assert leaf.shape == ref.shape and leaf.dtype == ref.dtype
    assert bool(jnp.all(jnp.isfinite(leaf.astype(jnp.float32))))
  assert int(optax.tree_utils.tree_get(state, "count")) == 3
  assert _loss(new_params) < _loss(params)


@names
def test_converges_on_quadratic(name):
  target = jnp.array([1.0, -2.0, 3.0])
  tx = TRANSFORMS[name](0.05)

  def body(carry, _):
    x, state = carry
    updates, state = tx.update(jax.grad(lambda x: jnp.sum((x - target) ** 2))(x), state, x)
    return (optax.apply_updates(x, updates), state), None

  x0 = jnp.zeros(3)
  (x, _), _ = jax.jit(lambda x0: jax.lax.scan(body, (x0, tx.init(x0)), None, length=1000))(x0)
  np.testing.assert_allclose(x, target, atol=1e-2)


def test_composes_in_chain_and_inject_hyperparams_without_recompiling():
  tx = optax.chain(
    optax.clip_by_global_norm(1.0), optax.inject_hyperparams(torch_adam)(lr=1e-2, weight_decay=1e-3)
  )
  traces = []

  @jax.jit
  def step(params, state):
    traces.append(1)
    updates, state = tx.update(jax.grad(_loss)(params), state, params)
    return updates, state

  params = _params()
  state = tx.init(params)
  u1, _ = step(params, state)
  state[1].hyperparams["lr"] = jnp.asarray(2e-2, jnp.float32)
  u2, _ = step(params, state)
  assert len(traces) == 1
  # First step: -lr * m / (|m| + eps) for any betas, so doubling lr doubles it.
  np.testing.assert_allclose(u2["dense"]["kernel"], 2 * u1["dense"]["kernel"], rtol=1e-6)


def test_state_names_follow_optax():
  state = torch_adam(amsgrad=True).init({"w": jnp.ones(2)})
  inner = state[0]
  assert isinstance(inner, ScaleByTorchAdamState) and inner._fields == (
    "count",
    "mu",
    "nu",
    "nu_max",
  )
  assert torch_adam().init({"w": jnp.ones(2)})[0].nu_max is None


@pytest.mark.parametrize(
  "kwargs,match",
  [
    ({"lr": -1e-3}, "lr"),
    ({"betas": (1.0, 0.999)}, r"betas\[0\]"),
    ({"betas": (0.9, -0.1)}, r"betas\[1\]"),
    ({"betas": 0.9}, "pair"),
    ({"eps": -1.0}, "eps"),
    ({"weight_decay": -0.1}, "weight_decay"),
  ],
)
def test_invalid_hyperparameters_raise(kwargs, match):
  with pytest.raises(ValueError, match=match):
    torch_adam(**kwargs)


def test_traced_betas_and_missing_params_raise():
  with pytest.raises(ValueError, match="concrete"):
    jax.jit(lambda b: torch_adam(betas=(b, 0.999)).init(jnp.ones(2)))(0.9)
  tx = torch_adam(weight_decay=0.1)
  with pytest.raises(ValueError, match="params"):
    tx.update(jnp.ones(2), tx.init(jnp.ones(2)))


if __name__ == "__main__":
  _torch_worker(sys.argv[1])
