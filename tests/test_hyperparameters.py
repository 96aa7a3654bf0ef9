"""Hyperparameters in every form optax accepts, for every preset; inject_hyperparams in bf16/f16."""

import inspect
import typing

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adamjax
from adamjax.testing import run_optax

LR = {"torch_adam": "lr", "torch_adamw": "lr"}

# preset -> its numeric hyperparameters and a valid value of each (betas representable in
# bfloat16: 0.999 is 1.0 there).
HYPERPARAMETERS = {
  "adam": {"learning_rate": 1e-3, "b1": 0.9, "b2": 0.99, "eps": 1e-8, "eps_root": 1e-9},
  "adamw": {"learning_rate": 1e-3, "b1": 0.9, "b2": 0.99, "eps": 1e-8, "weight_decay": 1e-2},
  "keras_adam": {
    "learning_rate": 1e-3,
    "beta_1": 0.9,
    "beta_2": 0.99,
    "epsilon": 1e-7,
    "weight_decay": 4e-3,
    "clipnorm": 1.0,
    "ema_momentum": 0.9,
    "loss_scale_factor": 8.0,
  },
  "keras_adamw": {"learning_rate": 1e-3, "weight_decay": 4e-3, "beta_1": 0.9, "epsilon": 1e-7},
  "tf1_adam": {"learning_rate": 1e-3, "beta1": 0.9, "beta2": 0.99, "epsilon": 1e-8},
  "torch_adam": {"lr": 1e-3, "eps": 1e-8, "weight_decay": 1e-2},
  "torch_adamw": {"lr": 1e-3, "eps": 1e-8, "weight_decay": 1e-2},
}
EXTRA = {"keras_adam": {"use_ema": True}}

FORMS = {
  "python": lambda v: v,
  "np.float64": np.float64,
  "np.float32": np.float32,
  "np.float16": np.float16,
  "np 0-d array": lambda v: np.asarray(v, np.float32),
  "jax float32": lambda v: jnp.asarray(v, jnp.float32),
  "jax float16": lambda v: jnp.asarray(v, jnp.float16),
  "jax bfloat16": lambda v: jnp.asarray(v, jnp.bfloat16),
}

CASES = [(p, n) for p in sorted(HYPERPARAMETERS) for n in HYPERPARAMETERS[p]]


def _one_step(tx, params):
  grads = jax.tree.map(lambda p: jnp.full_like(p, 0.25), params)
  updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  return updates


@pytest.mark.parametrize("preset,name", CASES)
def test_every_hyperparameter_accepts_every_scalar_form(preset, name):
  params = {"w": jnp.ones((2, 3)), "b": jnp.zeros(3)}
  base = HYPERPARAMETERS[preset] | EXTRA.get(preset, {})
  for form, make in FORMS.items():
    tx = getattr(adamjax, preset)(**base | {name: make(base[name])})
    updates = _one_step(tx, params)
    assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(updates)), form


@pytest.mark.parametrize("preset,name", CASES)
def test_every_hyperparameter_accepts_a_tracer(preset, name):
  params = {"w": jnp.ones((2, 3))}
  base = HYPERPARAMETERS[preset] | EXTRA.get(preset, {})

  @jax.jit
  def step(value):
    tx = getattr(adamjax, preset)(**base | {name: value})
    grads = {"w": jnp.full((2, 3), 0.25)}
    return tx.update(grads, tx.init(params), params)[0]

  traced = step(jnp.asarray(base[name], jnp.float32))
  direct = _one_step(getattr(adamjax, preset)(**base), params)
  # A traced scalar is not constant-folded with the others, so the last bits may differ.
  np.testing.assert_allclose(traced["w"], direct["w"], rtol=2e-5)


def _inputs(steps=50):
  rng = np.random.default_rng(0)
  params = {"kernel": rng.normal(size=(3, 5)).astype(np.float32), "bias": np.zeros(5, np.float32)}
  grads = {k: rng.normal(size=(steps, *v.shape)).astype(np.float32) for k, v in params.items()}
  return params, grads


@pytest.mark.parametrize(
  "kwargs",
  [
    {"learning_rate": -1e-3},  # gradient ascent
    {"learning_rate": jnp.full((1,), 1e-3)},
    {"learning_rate": 1e-3, "b2": jnp.linspace(0.9, 0.999, 5)},  # per column, broadcasts
    {"learning_rate": 1e-3, "b1": np.float16(0.9), "eps": jnp.asarray(1e-6, jnp.bfloat16)},
  ],
)
@pytest.mark.parametrize("name", ["adam", "adamw"])
def test_inputs_optax_accepts_give_optax_results(name, kwargs):
  if name == "adamw":
    kwargs = kwargs | {"weight_decay": -1e-2}  # negative decay: accepted, as optax does
  params, grads = _inputs()
  with jax.numpy_rank_promotion("allow"):  # JAX's default; this suite's conftest raises
    ours = run_optax(getattr(adamjax, name)(**kwargs), params, grads)
    theirs = run_optax(getattr(optax, name)(**kwargs), params, grads)
  for field in theirs:
    for leaf in theirs[field]:
      np.testing.assert_array_equal(ours[field][leaf], theirs[field][leaf])
  assert np.any(ours["params"]["kernel"][-1] != params["kernel"])


def test_gradient_ascent_climbs():
  params, grads = _inputs(steps=1)
  for tx in (adamjax.adam(-0.1), adamjax.keras_adam(-0.1), adamjax.tf1_adam(-0.1)):
    out = run_optax(tx, params, grads)
    moved = out["params"]["kernel"][0] - params["kernel"]
    assert np.all(np.sign(moved) == np.sign(grads["kernel"][0])), tx


def test_adam_takes_mu_dtype_by_position_as_optax():
  params, grads = _inputs()
  args = (1e-3, 0.9, 0.999, 1e-8, 0.0, jnp.bfloat16)
  ours = run_optax(adamjax.adam(*args), params, grads)
  theirs = run_optax(optax.adam(*args), params, grads)
  assert ours["mu"]["kernel"].dtype == jnp.bfloat16
  np.testing.assert_array_equal(ours["params"]["kernel"], theirs["params"]["kernel"])
  ours_w = run_optax(adamjax.adamw(*args, -1e-2), params, grads)
  theirs_w = run_optax(optax.adamw(*args, -1e-2), params, grads)
  np.testing.assert_array_equal(ours_w["params"]["kernel"], theirs_w["params"]["kernel"])


@pytest.mark.parametrize("preset", sorted(HYPERPARAMETERS) + ["scale_by_keras_adam"])
def test_learning_rate_annotation_is_optax_type_at_run_time(preset):
  # optax's tools (its contrib wrappers, its tests) compare the annotation with the type.
  fn = getattr(adamjax, preset)
  lr = LR.get(preset, "learning_rate")
  assert inspect.signature(fn).parameters[lr].annotation is optax.ScalarOrSchedule
  assert typing.get_type_hints(fn)[lr] == optax.ScalarOrSchedule


def test_integer_parameters_are_refused_where_optax_truncates_them():
  # optax accepts {'a': 1, 'b': 2} and returns {'a': 0, 'b': 1} after one step (the update is
  # -0.001, truncated toward zero); adamjax refuses integer gradients.
  params = {"a": 1, "b": 2}
  tx = optax.adam(1e-3)
  updates, _ = tx.update(params, tx.init(params))
  assert optax.apply_updates(params, updates) == {"a": 0, "b": 1}
  ours = adamjax.adam(1e-3)
  with pytest.raises(TypeError, match=r"\['a'\] has dtype int32.*floating-point"):
    ours.update(params, ours.init(params))


# ---- optax.inject_hyperparams with bfloat16 and float16 models, under jit ----


def _train(tx, dtype, steps=150):
  """Least squares on 8 features, one jitted step at a time (optax's injected Adam with float32
  hyperparameters turns a float16 `mu` into float32, which `lax.scan` would refuse); returns
  (initial loss, final loss, final params)."""
  x = jax.random.normal(jax.random.PRNGKey(0), (64, 8))
  y = x @ (jnp.arange(8.0) / 8)
  params = {"w": jnp.zeros(8, dtype), "b": jnp.zeros((), dtype)}

  def loss(p):
    return jnp.mean(((x.astype(dtype) @ p["w"] + p["b"]).astype(jnp.float32) - y) ** 2)

  @jax.jit
  def step(p, s):
    updates, s = tx.update(jax.grad(loss)(p), s, p)
    return optax.apply_updates(p, updates), s

  final, state = params, tx.init(params)
  for _ in range(steps):
    final, state = step(final, state)
  return float(loss(params)), float(loss(final)), final


INJECT = {
  "adam": {"learning_rate": 1e-2},
  "adamw": {"learning_rate": 1e-2, "weight_decay": 1e-3},
  "keras_adam": {"learning_rate": 1e-2},
  "keras_adamw": {"learning_rate": 1e-2},
  "tf1_adam": {"learning_rate": 1e-2},
  "torch_adam": {"lr": 1e-2},
  "torch_adamw": {"lr": 1e-2},
}
# What the injected preset is compared with, bit for bit: optax's own injected Adam for the
# optax presets; the un-injected preset for those that round their scalars themselves.
SAME_AS_OPTAX = {"adam", "adamw"}
SAME_AS_UNINJECTED = {"keras_adam", "keras_adamw", "torch_adam", "torch_adamw"}


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize("preset", sorted(INJECT))
def test_inject_hyperparams_trains_low_precision_models(preset, dtype):
  factory, kwargs = getattr(adamjax, preset), INJECT[preset]
  betas = {"adam": "b2", "adamw": "b2", "tf1_adam": "beta2"}.get(preset, "beta_2")
  if dtype == jnp.bfloat16 and preset in ("keras_adam", "keras_adamw", "tf1_adam"):
    # They compute in the parameters' dtype, as Keras and TF do, and refuse beta_2=0.999 (1.0
    # in bfloat16) injected or not (test_errors.py).
    kwargs = kwargs | {betas: 0.95}
  # Default betas with the hyperparameters kept in float32 (0.999 is 1.0 in bfloat16).
  injected = _train(
    optax.inject_hyperparams(factory, hyperparam_dtype=jnp.float32)(**kwargs), dtype
  )
  plain = _train(factory(**kwargs), dtype)
  print(
    f"{preset} {dtype.__name__}: loss {injected[0]:.4f} -> injected {injected[1]:.6f}, "
    f"un-injected {plain[1]:.6f}"
  )
  assert injected[1] < 0.02 * injected[0] and plain[1] < 0.02 * plain[0]
  if preset in SAME_AS_OPTAX:
    theirs = _train(
      optax.inject_hyperparams(getattr(optax, preset), hyperparam_dtype=jnp.float32)(**kwargs),
      dtype,
    )
    jax.tree.map(np.testing.assert_array_equal, injected[2], theirs[2])
  if preset in SAME_AS_UNINJECTED:
    jax.tree.map(np.testing.assert_array_equal, injected[2], plain[2])
  # Hyperparameters in the parameters' dtype (optax's default), with betas that dtype holds.
  low = kwargs | ({} if preset.startswith("torch") else {betas: 0.95})
  in_dtype = _train(optax.inject_hyperparams(factory)(**low), dtype)
  assert in_dtype[1] < 0.02 * in_dtype[0]
  if preset in SAME_AS_OPTAX:
    theirs = _train(optax.inject_hyperparams(getattr(optax, preset))(**low), dtype)
    jax.tree.map(np.testing.assert_array_equal, in_dtype[2], theirs[2])


def test_inject_hyperparams_refuses_a_beta_that_rounds_to_one_where_optax_trains_on_nan():
  kwargs = {"learning_rate": 1e-2}
  # optax's default b2=0.999 is 1.0 in bfloat16: the bias correction is 0 and optax gives NaN.
  assert np.isnan(_train(optax.inject_hyperparams(optax.adam)(**kwargs), jnp.bfloat16)[1])
  for factory in (adamjax.adam, adamjax.keras_adam, adamjax.tf1_adam):
    with pytest.raises(ValueError, match=r"rounds betas near 1 to 1.0.*hyperparam_dtype"):
      _train(optax.inject_hyperparams(factory)(**kwargs), jnp.bfloat16)
