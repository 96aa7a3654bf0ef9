"""adamjax.dynamic_loss_scale against Keras 3's LossScaleOptimizer (JAX backend)."""

import jax
import jax.numpy as jnp
import keras
import numpy as np
import optax
import pytest

import adamjax
from adamjax.testing import make_gradient_sequence, make_params, max_ulps, run_optax

SHAPES = {"bias": (7,), "kernel": (3, 5), "scale": ()}
GROWTH = 4


def _inputs(steps):
  params = make_params(SHAPES, 5)
  grads = make_gradient_sequence(SHAPES, steps, 6)
  grads = {k: g * np.float32(2.0**10) for k, g in grads.items()}  # "scaled" gradients
  # Overflowed steps: an inf in one tensor, a NaN in another, two in a row, and late ones.
  for step, name, value in [
    (3, "kernel", np.inf),
    (9, "bias", np.nan),
    (10, "scale", -np.inf),
    (17, "kernel", np.nan),
  ]:
    grads[name][(step,) + (0,) * (grads[name].ndim - 1)] = value
  return params, grads


def _keras(params, grads, jit):
  names = sorted(params)
  variables = [keras.Variable(params[n], name=f"p{i}") for i, n in enumerate(names)]
  optimizer = keras.optimizers.LossScaleOptimizer(
    keras.optimizers.Adam(), initial_scale=2.0**12, dynamic_growth_steps=GROWTH
  )
  optimizer.build(variables)
  step = jax.jit(optimizer.stateless_apply) if jit else optimizer.stateless_apply
  opt_values = [v.value for v in optimizer.variables]
  values = [v.value for v in variables]
  history, scales = [], []
  scale_index = [i for i, v in enumerate(optimizer.variables) if "dynamic_scale" in v.path][0]
  for t in range(len(grads[names[0]])):
    values, opt_values = step(opt_values, [jnp.asarray(grads[n][t]) for n in names], values)
    history.append([np.asarray(v) for v in values])
    scales.append(float(opt_values[scale_index]))
  return {n: np.stack([h[i] for h in history]) for i, n in enumerate(names)}, np.array(scales)


def _ours(params, grads, fused, jit=True):
  tx = adamjax.dynamic_loss_scale(
    adamjax.keras_adam(fused_multiply_add=fused), initial_scale=2.0**12, dynamic_growth_steps=GROWTH
  )
  return run_optax(tx, params, grads, jit=jit, fields=("loss_scale",))


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_dynamic_loss_scale_equals_keras_loss_scale_optimizer(jit):
  params, grads = _inputs(steps=30 if not jit else 300)
  expected, scales = _keras(params, grads, jit=jit)
  ours = _ours(params, grads, fused=jit)
  np.testing.assert_array_equal(ours["loss_scale"], scales)
  assert max_ulps(ours["params"], expected) == 0
  # Not vacuous: the scale both halved (overflows) and doubled (GROWTH finite steps).
  assert scales.min() < 2.0**12 < scales.max()
  # Skipped steps leave the parameters exactly as they were.
  for step in (3, 9, 10, 17):
    np.testing.assert_array_equal(
      ours["params"]["kernel"][step], ours["params"]["kernel"][step - 1]
    )


def test_scale_loss_multiplies_by_the_current_scale():
  tx = adamjax.dynamic_loss_scale(adamjax.adam(1e-3), initial_scale=8.0)
  state = tx.init(jnp.ones(2))
  assert float(adamjax.scale_loss(jnp.float32(1.5), state)) == 12.0
  with pytest.raises(ValueError, match="dynamic_loss_scale"):
    adamjax.scale_loss(jnp.float32(1.0), adamjax.adam(1e-3).init(jnp.ones(2)))


def test_dynamic_loss_scale_composes_with_optax():
  tx = optax.chain(optax.clip_by_global_norm(1.0), adamjax.keras_adam())
  tx = adamjax.dynamic_loss_scale(tx, dynamic_growth_steps=2)
  params = {"w": jnp.ones(3)}
  state = tx.init(params)
  step = jax.jit(tx.update)
  for _ in range(3):
    updates, state = step({"w": jnp.full(3, 2.0**15)}, state, params)
  assert float(state.loss_scale) == 2.0**16
  assert int(state.step_counter) == 1


@pytest.mark.parametrize(
  "kwargs,words",
  [
    ({"initial_scale": -1.0}, "initial_scale"),
    ({"dynamic_growth_steps": 0}, "dynamic_growth_steps"),
  ],
)
def test_invalid_arguments(kwargs, words):
  with pytest.raises(ValueError, match=words):
    adamjax.dynamic_loss_scale(adamjax.adam(1e-3), **kwargs)
