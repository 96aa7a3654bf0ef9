"""Every keras.optimizers.Adam option, alone and combined, against the real Keras 3.

600 steps of gradients from 1e-8 to 1e2 on four shapes; parameters, both moments and (with EMA)
the moving average after every step, compared per element:

- against Keras 3 on the JAX backend run op by op (`stateless_apply` eagerly), bit for bit;
- `fused_multiply_add=True` against Keras 3 on the JAX backend jitted, bit for bit;
- against Keras 3 on the TensorFlow backend (eager `apply_gradients`), within 2 ulps where every
  operation is elementwise. The clip options sum squares, and XLA and Eigen sum in different
  orders, so there the bound is relative (`CLIP_RTOL`).

Two documented limits of expressing Keras in optax's `params + updates` form, where Keras
assigns the variable twice in a step (weight decay, then the step; or an EMA overwrite): the
single update that reproduces both assignments is exact unless a parameter moves by more than
half its magnitude (it crosses zero), where it can be off by an ulp *of the step* (< 1e-9 here).
Parameters are held to that (`_PARAM_ATOL`); the moments and the average stay bit for bit.
And XLA turns a division by a constant into a multiplication by its reciprocal, as Keras-on-JAX
gets too, but not TensorFlow: with non-power-of-two loss scales or accumulation steps the
op-by-op and TF references differ from each other, so those configurations (`NOT_POW2`) are
checked against jitted Keras-JAX (fused) and against TF, not against eager Keras-JAX; so are
the accumulating configurations, because eager Keras-JAX accumulation takes minutes.
"""

import functools

import jax.numpy as jnp
import keras
import numpy as np
import optax
import pytest

import adamjax
from adamjax.testing import (
  KERAS_ADAM_OPTIONS,
  KERAS_OPTIONS_ACCUMULATING,
  KERAS_OPTIONS_NOT_POW2,
  keras_adam_for_option,
  keras_option_config,
  make_gradient_sequence,
  make_params,
  max_ulps,
  run_keras_jax,
  run_keras_tf,
  run_optax,
)

SHAPES = {"bias": (7,), "kernel": (3, 5), "conv": (2, 3, 4), "scale": ()}
STEPS = 600
ULP_BOUND = 2
CLIP_RTOL = 1e-5
_PARAM_ATOL = 1e-9


CONFIGS = KERAS_ADAM_OPTIONS  # name -> Keras config ("schedule": keras_option_schedule()).
NOT_POW2 = KERAS_OPTIONS_NOT_POW2
# Keras-on-JAX accumulates with `lax.cond`, which run op by op takes minutes for 600 steps:
# these are checked against jitted Keras-JAX (fused) and against TF only.
ACCUMULATING = KERAS_OPTIONS_ACCUMULATING


def _ours(name, jit=True, fused=False):
  config = CONFIGS[name]
  fields = ("mu", "nu") + (("nu_max",) if config.get("amsgrad") else ())
  fields += ("ema",) if config.get("use_ema") else ()
  tx = keras_adam_for_option(name, fused_multiply_add=fused)
  return run_optax(tx, *_inputs(), jit=jit, fields=fields)


@functools.cache
def _inputs():
  return make_params(SHAPES, 3), make_gradient_sequence(SHAPES, STEPS, 4)


@functools.cache
def _keras(name, backend, jit=False):
  params, grads = _inputs()
  if backend == "tensorflow":
    return run_keras_tf(params, grads, keras_option_config(name))
  return run_keras_jax(params, grads, keras_option_config(name), jit=jit)


def _pairs(ours, reference):
  pairs = {"m": (ours["mu"], reference.m), "v": (ours["nu"], reference.v)}
  # AMSGrad's running maximum (Keras's `velocity_hat`), compared like the moments.
  assert ("nu_max" in ours) == (reference.v_hat is not None)
  if reference.v_hat is not None:
    pairs["v_hat"] = (ours["nu_max"], reference.v_hat)
  return pairs


def _assert_params_close(ours, reference, record=None):
  """Parameters (and their average): bit for bit but for the additive-update limit."""
  pairs = {"params": (ours["params"], reference.params)}
  if "ema" in ours:
    pairs["average"] = (ours["ema"], reference.extra["average"])
  for name, (a, b) in pairs.items():
    worst = max(float(np.max(np.abs(a[k] - b[k]))) for k in b)
    if record is not None:
      record(f"{name}_max_abs", worst)
      record(f"{name}_max_ulps", max_ulps(a, b))
    assert worst <= _PARAM_ATOL, (name, worst)


def _assert_bit_for_bit(ours, reference, record=None):
  diff = {k: max_ulps(a, b) for k, (a, b) in _pairs(ours, reference).items()}
  if record is not None:
    record("state_max_ulps", diff)
  assert set(diff.values()) == {0}, diff
  _assert_params_close(ours, reference, record)
  np.testing.assert_array_equal(reference.extra["iterations"], np.arange(1, STEPS + 1))


@pytest.mark.parametrize("name", sorted(set(CONFIGS) - NOT_POW2 - ACCUMULATING))
def test_option_equals_keras_jax_backend_bit_for_bit(name, record_property):
  _assert_bit_for_bit(_ours(name), _keras(name, "jax"), record_property)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_fused_option_equals_jitted_keras_jax_backend_bit_for_bit(name, record_property):
  _assert_bit_for_bit(_ours(name, fused=True), _keras(name, "jax", jit=True), record_property)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_option_matches_keras_tensorflow_backend(name, record_property):
  ours, reference = _ours(name), _keras(name, "tensorflow")
  pairs = _pairs(ours, reference) | {"params": (ours["params"], reference.params)}
  if "ema" in ours:
    pairs["average"] = (ours["ema"], reference.extra["average"])
  diff = {k: max_ulps(a, b) for k, (a, b) in pairs.items()}
  record_property("max_ulps", diff)
  if any(k in CONFIGS[name] for k in ("clipnorm", "global_clipnorm")):
    # Relative to each value, and to the largest magnitude of its tensor over the run (the
    # moments pass through zero, where a relative bound alone means nothing).
    for key, (a, b) in pairs.items():
      for leaf in a:
        scale = float(np.max(np.abs(b[leaf])))
        np.testing.assert_allclose(
          a[leaf], b[leaf], rtol=CLIP_RTOL, atol=CLIP_RTOL * scale, err_msg=f"{key}[{leaf}]"
        )
  else:
    assert max(max_ulps(a, b) for a, b in _pairs(ours, reference).values()) <= ULP_BOUND, diff
    _assert_params_close(ours, reference)


def test_options_run_eagerly_too():
  for name in ("wd_globalclip_ema", "ema_overwrite"):
    _assert_bit_for_bit(_ours(name, jit=False), _keras(name, "jax"))


# ---- Keras's own golden values (keras/src/optimizers/adam_test.py) ----


def test_golden_single_step():
  tx = adamjax.keras_adam(learning_rate=0.5)
  params = jnp.array([1.0, 2.0, 3.0, 4.0])
  updates, _ = tx.update(jnp.array([1.0, 6.0, 7.0, 2.0]), tx.init(params), params)
  np.testing.assert_allclose(
    optax.apply_updates(params, updates), [0.5, 1.5, 2.5, 3.5], rtol=1e-4, atol=1e-4
  )


def test_golden_weight_decay_and_exclusion():
  params = {"var1": jnp.asarray(2.0), "exclude": jnp.asarray(2.0)}
  zeros = {"var1": jnp.asarray(0.0), "exclude": jnp.asarray(0.0)}
  for _ in range(3):  # three optimizers each decay var1 once in Keras's test
    tx = adamjax.keras_adam(1.0, weight_decay=0.004, exclude_from_weight_decay=["exclude"])
    updates, _ = tx.update(zeros, tx.init(params), params)
    params = optax.apply_updates(params, updates)
  np.testing.assert_allclose(params["var1"], 1.9760959, atol=1e-6)
  assert float(params["exclude"]) == 2.0


def test_golden_amsgrad_rows():
  tx = adamjax.keras_adam(amsgrad=True)
  x = jnp.ones(10)
  state = tx.init(x)
  golden = [0.999, 0.9982, 0.9974, 0.9965, 0.9955]
  updates, state = tx.update(jnp.full(10, 0.01), state, x)
  x = optax.apply_updates(x, updates)
  for row in golden:
    np.testing.assert_allclose(x, np.full(10, row), rtol=5e-4, atol=5e-4)
    updates, state = tx.update(jnp.arange(0.1, 1.1, 0.1)[:10], state, x)
    x = optax.apply_updates(x, updates)


def test_golden_clip_norm_and_value():
  g = jnp.array([100.0, 100.0])
  tx = adamjax.keras_clip_by_norm(1.0)
  clipped, _ = tx.update(g, tx.init(g))
  np.testing.assert_allclose(clipped, [2**0.5 / 2, 2**0.5 / 2], rtol=1e-6)
  tx = adamjax.keras_clip_by_value(1.0)
  clipped, _ = tx.update(g, tx.init(g))
  np.testing.assert_array_equal(clipped, [1.0, 1.0])


# ---- What Keras refuses, refused here with the same kind of error ----


@pytest.mark.parametrize(
  "kwargs,words",
  [
    ({"clipnorm": 1.0, "global_clipnorm": 1.0}, "Only one of clipnorm"),
    ({"clipvalue": 1.0, "clipnorm": 2.0}, "Only one of clipnorm"),
    ({"gradient_accumulation_steps": 1}, "gradient_accumulation_steps must be an integer >= 2"),
    ({"gradient_accumulation_steps": 2.5}, "gradient_accumulation_steps must be an integer"),
    ({"learning_rate": 1}, "integer 1"),
    ({"use_ema": True, "ema_momentum": 1.5}, "ema_momentum"),
    ({"use_ema": True, "ema_overwrite_frequency": -1}, "ema_overwrite_frequency"),
    ({"weight_decay": float("nan")}, "weight_decay must be finite"),
    ({"loss_scale_factor": 0.0}, "loss_scale_factor must be > 0"),
  ],
)
def test_invalid_combinations_raise_like_keras(kwargs, words):
  with pytest.raises(ValueError, match=words):
    adamjax.keras_adam(**kwargs)
  if (
    "weight_decay" in kwargs
    or "loss_scale_factor" in kwargs
    or kwargs.get("gradient_accumulation_steps") == 2.5
  ):
    return  # Keras accepts these (and misbehaves later); ours refuses up front.
  with pytest.raises(ValueError):
    keras.optimizers.Adam(**kwargs)


def test_keras_adamw_defaults_to_keras_adamw_decay():
  params, grads = _inputs()
  ours = run_optax(adamjax.keras_adamw(), params, grads)
  reference = run_keras_jax(params, grads, {"weight_decay": 0.004}, jit=False)
  assert keras.optimizers.AdamW().weight_decay == 0.004
  assert max_ulps(ours["mu"], reference.m) == 0
  _assert_params_close(ours, reference)


def test_ema_params_reads_the_average():
  ours, reference = _ours("ema"), _keras("ema", "jax")
  np.testing.assert_array_equal(ours["ema"]["kernel"], reference.extra["average"]["kernel"])
  tx = adamjax.keras_adam(use_ema=True)
  state = tx.init({"w": jnp.ones(2)})
  assert adamjax.ema_params(state)["w"].shape == (2,)
  with pytest.raises(ValueError, match="use_ema=True"):
    adamjax.ema_params(adamjax.keras_adam().init({"w": jnp.ones(2)}))
