"""Contract tests: every public transformation behaves as an optax/Flax user expects."""

import functools

import flax.linen as linen
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from flax.training import train_state

import adamjax

# name -> factory(learning_rate) for every public transformation (scale_by_* are finished into
# a descent step the way users compose them).
TRANSFORMS = {
  "adam": lambda lr: adamjax.adam(lr),
  "adam_nesterov": lambda lr: adamjax.adam(lr, nesterov=True),
  "adam_mu_bf16": lambda lr: adamjax.adam(lr, mu_dtype=jnp.bfloat16),
  "keras_adam": lambda lr: adamjax.keras_adam(lr),
  "keras_adam_amsgrad": lambda lr: adamjax.keras_adam(lr, amsgrad=True),
  "keras_adam_fma": lambda lr: adamjax.keras_adam(lr, fused_multiply_add=True),
  "tf1_adam": lambda lr: adamjax.tf1_adam(lr),
  "adamw": lambda lr: adamjax.adamw(lr, weight_decay=1e-4),
  "keras_adamw": lambda lr: adamjax.keras_adamw(lr, weight_decay=1e-4),
  "keras_adam_all_options": lambda lr: adamjax.keras_adam(
    lr, amsgrad=True, weight_decay=1e-4, global_clipnorm=100.0, use_ema=True, loss_scale_factor=2.0
  ),  # (accumulation changes when a step happens: test_keras_options)
  "torch_adam": lambda lr: adamjax.torch_adam(lr),
  "torch_adamw": lambda lr: adamjax.torch_adamw(lr, weight_decay=1e-4),
  "scale_by_adam": lambda lr: optax.chain(adamjax.scale_by_adam(), optax.scale(-lr)),
  "scale_by_keras_adam": lambda lr: optax.chain(adamjax.scale_by_keras_adam(lr), optax.scale(-1.0)),
  "scale_by_tf1_adam": lambda lr: optax.chain(adamjax.scale_by_tf1_adam(lr), optax.scale(-1.0)),
}
# The factories whose hyperparameters `optax.inject_hyperparams` can take directly.
FACTORIES = {
  "adam": (adamjax.adam, "learning_rate", {"b1": 0.9, "b2": 0.999}),
  "keras_adam": (adamjax.keras_adam, "learning_rate", {"beta_1": 0.9, "beta_2": 0.999}),
  "tf1_adam": (adamjax.tf1_adam, "learning_rate", {"beta1": 0.9, "beta2": 0.999}),
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
  leaves = jax.tree.leaves(params)
  return sum(jnp.sum((leaf.astype(jnp.float32) - 0.25) ** 2) for leaf in leaves)


# Keras and TF compute in the parameter dtype, where beta_2 = 0.999 rounds to 1: they refuse
# bfloat16 parameters (tested in test_errors.py) and are checked in float16 instead.
LOW_PRECISION = {
  name: jnp.float16 if ("keras" in name or "tf1" in name) else jnp.bfloat16 for name in TRANSFORMS
}


@names
@pytest.mark.parametrize("low_precision", [False, True])
def test_jitted_step_keeps_shapes_dtypes_and_finite(name, low_precision):
  dtype = LOW_PRECISION[name] if low_precision else jnp.float32
  tx = TRANSFORMS[name](1e-2)
  params = _params(dtype)
  state = jax.jit(tx.init)(params)

  @jax.jit
  def step(params, state):
    grads = jax.grad(_loss)(params)
    grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, updates

  new_params, new_state, updates = step(params, state)
  for tree in (new_params, updates):
    assert jax.tree.structure(tree) == jax.tree.structure(params)
    for leaf, ref in zip(jax.tree.leaves(tree), jax.tree.leaves(params), strict=True):
      assert leaf.shape == ref.shape and leaf.dtype == ref.dtype
      assert bool(jnp.all(jnp.isfinite(leaf.astype(jnp.float32))))
  assert all(
    bool(jnp.all(jnp.isfinite(x.astype(jnp.float32))))
    for x in jax.tree.leaves(new_state)
    if jnp.issubdtype(x.dtype, jnp.inexact)
  )
  assert int(optax.tree_utils.tree_get(new_state, "count")) == 1
  assert not all(
    bool(jnp.all(a == b))
    for a, b in zip(jax.tree.leaves(new_params), jax.tree.leaves(params), strict=True)
  )


@names
def test_second_call_does_not_recompile(name):
  tx = TRANSFORMS[name](1e-2)
  traces = []

  @jax.jit
  def step(params, state):
    traces.append(1)
    updates, state = tx.update(jax.grad(_loss)(params), state, params)
    return optax.apply_updates(params, updates), state

  params = _params()
  state = tx.init(params)
  params, state = step(params, state)
  params, state = step(params, state)
  params, state = step(params, state)
  assert len(traces) == 1
  assert step._cache_size() == 1


def _minimise(tx, loss, x0, steps):
  def body(carry, _):
    x, state = carry
    updates, state = tx.update(jax.grad(loss)(x), state, x)
    return (optax.apply_updates(x, updates), state), None

  (x, _), _ = jax.lax.scan(body, (x0, tx.init(x0)), None, length=steps)
  return x


@names
def test_converges_on_quadratic(name):
  target = jnp.array([1.0, -2.0, 3.0])
  x = jax.jit(
    functools.partial(
      _minimise, TRANSFORMS[name](0.05), lambda x: jnp.sum((x - target) ** 2), steps=1000
    )
  )(jnp.zeros(3))
  np.testing.assert_allclose(x, target, atol=1e-2)


@names
def test_converges_on_rosenbrock(name):
  def rosenbrock(x):
    return (1.0 - x[0]) ** 2 + 100.0 * (x[1] - x[0] ** 2) ** 2

  x = jax.jit(functools.partial(_minimise, TRANSFORMS[name](0.01), rosenbrock, steps=10000))(
    jnp.array([-1.2, 1.0])
  )
  np.testing.assert_allclose(x, jnp.ones(2), atol=2e-2)


@names
def test_composes_in_chain_masked_if_finite_and_multisteps(name):
  tx = optax.chain(
    optax.clip_by_global_norm(1.0),
    optax.masked(TRANSFORMS[name](1e-2), {"dense": True, "scale": False}),
  )
  tx = optax.apply_if_finite(tx, max_consecutive_errors=3)
  tx = optax.MultiSteps(tx, every_k_schedule=2)
  params = _params()
  state = tx.init(params)
  step = jax.jit(tx.update)
  grads = jax.grad(_loss)(params)
  updates, state = step(grads, state, params)
  assert all(bool(jnp.all(u == 0)) for u in jax.tree.leaves(updates))  # accumulating
  updates, state = step(grads, state, params)
  assert bool(jnp.any(updates["dense"]["kernel"] != 0))
  # The masked-out leaf passes through the clipped (accumulated) gradient untouched by Adam.
  clipped, _ = optax.clip_by_global_norm(1.0).update(grads, optax.EmptyState())
  np.testing.assert_allclose(updates["scale"], clipped["scale"], rtol=1e-6)
  bad = jax.tree.map(lambda g: g * jnp.nan, grads)
  before = state
  updates, state = step(bad, state, params)
  updates, state = step(bad, state, params)
  assert all(bool(jnp.all(u == 0)) for u in jax.tree.leaves(updates))
  assert int(state.inner_opt_state.notfinite_count) == 1
  np.testing.assert_array_equal(
    optax.tree_utils.tree_get(before.inner_opt_state, "count"),
    optax.tree_utils.tree_get(state.inner_opt_state, "count"),
  )


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_inject_hyperparams_changes_lr_and_betas_without_recompiling(name):
  factory, lr_name, betas = FACTORIES[name]
  tx = optax.inject_hyperparams(factory)(**{lr_name: 1e-2}, **betas)
  traces = []

  @jax.jit
  def step(params, state):
    traces.append(1)
    updates, state = tx.update(jax.grad(_loss)(params), state, params)
    return updates, state

  params = _params()
  state = tx.init(params)
  u1, _ = step(params, state)
  state.hyperparams[lr_name] = jnp.asarray(2e-2, jnp.float32)
  u2, state = step(params, state)
  np.testing.assert_allclose(u2["dense"]["kernel"], 2 * u1["dense"]["kernel"], rtol=1e-6)
  # The betas matter from the second step on (the first is lr * sign(g) for any beta).
  beta_name = next(iter(betas))
  same, _ = step(params, state)
  state.hyperparams[beta_name] = jnp.asarray(0.5, jnp.float32)
  changed, _ = step(params, state)
  assert len(traces) == 1
  assert bool(jnp.all(jnp.isfinite(changed["dense"]["kernel"])))
  assert bool(jnp.any(changed["dense"]["kernel"] != same["dense"]["kernel"]))


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_inject_hyperparams_schedule_matches_plain_schedule(name):
  factory, lr_name, betas = FACTORIES[name]
  schedule = optax.linear_schedule(1e-2, 1e-3, 50)
  plain = factory(**{lr_name: schedule})
  # With the betas static, injecting changes nothing, to the bit.
  static = optax.inject_hyperparams(factory, static_args=tuple(betas))(**{lr_name: schedule})
  # Injected betas are float32 arrays, so `1 - beta` rounds in float32 (0.100000024 instead of
  # Keras's 0.1): close, not bit-exact; optax.adam behaves the same way.
  injected = optax.inject_hyperparams(factory)(**{lr_name: schedule})
  run = lambda tx: jax.jit(functools.partial(_minimise, tx, _loss, steps=60))(_params())  # noqa: E731
  expected = run(plain)
  for a, b in zip(jax.tree.leaves(run(static)), jax.tree.leaves(expected), strict=True):
    np.testing.assert_array_equal(a, b)
  for a, b in zip(jax.tree.leaves(run(injected)), jax.tree.leaves(expected), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_state_exposes_count_mu_nu_for_tree_utils():
  params = _params()
  for tx in (adamjax.adam(1e-3), adamjax.keras_adam(), adamjax.tf1_adam()):
    state = tx.init(params)
    assert int(optax.tree_utils.tree_get(state, "count")) == 0
    for field in ("mu", "nu"):
      moment = optax.tree_utils.tree_get(state, field)
      assert jax.tree.structure(moment) == jax.tree.structure(params)


def test_adam_state_is_optax_adam_state():
  params = _params()
  ours, theirs = adamjax.adam(1e-3).init(params), optax.adam(1e-3).init(params)
  assert jax.tree.structure(ours) == jax.tree.structure(theirs)


class _MLP(nnx.Module):
  def __init__(self, rngs):
    self.hidden = nnx.Linear(4, 16, rngs=rngs)
    self.out = nnx.Linear(16, 1, rngs=rngs)

  def __call__(self, x):
    return self.out(nnx.relu(self.hidden(x)))


def _regression_data():
  x = jax.random.normal(jax.random.key(0), (64, 4))
  return x, jnp.sum(x * jnp.array([[1.0, -1.0, 0.5, 2.0]]), axis=1, keepdims=True)


@names
def test_trains_an_nnx_optimizer(name):
  model = _MLP(nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, TRANSFORMS[name](1e-2), wrt=nnx.Param)
  x, y = _regression_data()

  @nnx.jit
  def train_step(model, optimizer):
    loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
    optimizer.update(model, grads)
    return loss

  first = float(train_step(model, optimizer))
  for _ in range(200):
    last = float(train_step(model, optimizer))
  assert last < 0.1 * first


@pytest.mark.parametrize("name", ["adam", "keras_adam", "tf1_adam"])
def test_trains_a_linen_train_state(name):
  model = linen.Dense(1)
  x, y = _regression_data()
  state = train_state.TrainState.create(
    apply_fn=model.apply, params=model.init(jax.random.key(1), x), tx=TRANSFORMS[name](5e-2)
  )

  @jax.jit
  def train_step(state):
    loss, grads = jax.value_and_grad(lambda p: jnp.mean((state.apply_fn(p, x) - y) ** 2))(
      state.params
    )
    return state.apply_gradients(grads=grads), loss

  state, first = train_step(state)
  for _ in range(300):
    state, last = train_step(state)
  assert float(last) < 1e-2 * float(first)


def test_every_state_class_is_exported():
  # A user who checkpoints, inspects or builds a state by hand needs its class by public name.
  import importlib
  import pkgutil

  states = set()
  for info in pkgutil.iter_modules(adamjax.__path__):
    if info.name.startswith("_"):
      module = importlib.import_module(f"adamjax.{info.name}")
      states |= {
        name
        for name, obj in vars(module).items()
        if isinstance(obj, type) and name.endswith("State") and obj.__module__ == module.__name__
      }
  assert "KerasClipState" in states
  assert states <= set(adamjax.__all__), states - set(adamjax.__all__)
