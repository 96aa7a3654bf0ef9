"""keras_adam and tf1_adam against the real Keras 3 (JAX and TF backends) and TensorFlow.

Over 1,000 steps of gradients whose magnitudes span 1e-8 .. 1e2 (so epsilon matters), on four
shapes. Bounds, per element, on parameters and both moments:
- Keras 3, JAX backend, op by op (`stateless_apply` eagerly): bit for bit, jitted or eager.
- Keras 3, JAX backend, jitted `stateless_apply`: bit for bit with `fused_multiply_add=True`
  (XLA then fuses the same multiply-adds in both programs).
- Keras 3, TensorFlow backend, and TF's `ApplyAdam` kernel: at most 2 float32 ulps is the
  contract; the measured difference is 0 (products are rounded as TF rounds them, and XLA's
  float32 `pow` returns TF's bits for these exponents), which the tests report.
"""

import functools

import numpy as np
import optax
import pytest

import adamjax
from adamjax.testing import (
  make_gradient_sequence,
  make_params,
  max_ulps,
  run_keras_jax,
  run_keras_tf,
  run_optax,
  run_tf1_adam,
)

SHAPES = {"bias": (7,), "kernel": (3, 5), "conv": (2, 3, 4), "scale": ()}
STEPS = 1000
ULP_BOUND = 2

KERAS_CONFIGS = {
  "default": {},
  "amsgrad": {"amsgrad": True},
  "custom": {"learning_rate": 0.01, "beta_1": 0.8, "beta_2": 0.99, "epsilon": 1e-6},
}


@functools.cache
def _inputs(seed=0):
  return make_params(SHAPES, seed), make_gradient_sequence(SHAPES, STEPS, seed + 1)


@functools.cache
def _keras(config_name, backend, jit=False):
  params, grads = _inputs()
  config = KERAS_CONFIGS[config_name]
  if backend == "tensorflow":
    return run_keras_tf(params, grads, config)
  return run_keras_jax(params, grads, config, jit=jit)


def _ours(tx, amsgrad=False, jit=True):
  params, grads = _inputs()
  fields = ("mu", "nu", "nu_max") if amsgrad else ("mu", "nu")
  return run_optax(tx, params, grads, jit=jit, fields=fields)


def _compare(ours, reference, amsgrad=False):
  """Max ulps per recorded quantity: params, first moment, second moment (and its maximum)."""
  pairs = {
    "params": (ours["params"], reference.params),
    "m": (ours["mu"], reference.m),
    "v": (ours["nu"], reference.v),
  }
  if amsgrad:
    pairs["v_hat"] = (ours["nu_max"], reference.v_hat)
  return {k: max_ulps(a, b) for k, (a, b) in pairs.items()}


@pytest.mark.parametrize("config", sorted(KERAS_CONFIGS))
@pytest.mark.parametrize("jit", [True, False], ids=["jit", "eager"])
def test_keras_adam_equals_keras_jax_backend_bit_for_bit(config, jit):
  amsgrad = KERAS_CONFIGS[config].get("amsgrad", False)
  ours = _ours(adamjax.keras_adam(**KERAS_CONFIGS[config]), amsgrad, jit=jit)
  assert _compare(ours, _keras(config, "jax"), amsgrad) == dict.fromkeys(
    ["params", "m", "v"] + (["v_hat"] if amsgrad else []), 0
  )


@pytest.mark.parametrize("config", sorted(KERAS_CONFIGS))
def test_fused_keras_adam_equals_jitted_keras_jax_backend_bit_for_bit(config):
  amsgrad = KERAS_CONFIGS[config].get("amsgrad", False)
  ours = _ours(adamjax.keras_adam(**KERAS_CONFIGS[config], fused_multiply_add=True), amsgrad)
  diff = _compare(ours, _keras(config, "jax", jit=True), amsgrad)
  assert set(diff.values()) == {0}, diff


@pytest.mark.parametrize("config", sorted(KERAS_CONFIGS))
def test_keras_adam_matches_keras_tensorflow_backend(config, record_property):
  amsgrad = KERAS_CONFIGS[config].get("amsgrad", False)
  ours = _ours(adamjax.keras_adam(**KERAS_CONFIGS[config]), amsgrad)
  diff = _compare(ours, _keras(config, "tensorflow"), amsgrad)
  record_property("max_ulps", diff)
  assert max(diff.values()) <= ULP_BOUND, diff


def test_optax_adam_with_keras_epsilon_fails_the_keras_bound():
  # Negative control: same hyperparameters, Algorithm 1's epsilon instead of epsilon hat.
  ours = _ours(optax.adam(1e-3, eps=1e-7))
  diff = _compare(ours, _keras("default", "tensorflow"))
  assert diff["params"] > 1000 * ULP_BOUND, diff


@functools.cache
def _tf1(lr, beta1, beta2, epsilon):
  params, grads = _inputs()
  return run_tf1_adam(params, grads, lr, beta1, beta2, epsilon)


TF1_CONFIGS = [(0.001, 0.9, 0.999, 1e-8), (0.01, 0.8, 0.99, 1e-6)]


@pytest.mark.parametrize("config", TF1_CONFIGS, ids=["default", "custom"])
@pytest.mark.parametrize("jit", [True, False], ids=["jit", "eager"])
def test_tf1_adam_matches_tensorflow_apply_adam(config, jit):
  reference = _tf1(*config)
  ours = run_optax(
    adamjax.tf1_adam(*config),
    *_inputs(),
    jit=jit,
    fields=("mu", "nu", "beta1_power", "beta2_power"),
  )
  diff = _compare(ours, reference)
  assert max(diff.values()) <= ULP_BOUND, diff
  # The running products are TensorFlow's own float32 multiplications: equal to the bit.
  np.testing.assert_array_equal(ours["beta1_power"], reference.extra["beta1_power"])
  np.testing.assert_array_equal(ours["beta2_power"], reference.extra["beta2_power"])


def test_keras_preset_is_not_the_tf1_preset():
  # Control: the two epsilon-hat presets differ (pow versus running product, 1 - beta in
  # double versus float32), by more than the bound, on the same gradients.
  ours = _ours(adamjax.keras_adam(0.001, 0.9, 0.999, 1e-8))
  assert _compare(ours, _tf1(*TF1_CONFIGS[0]))["params"] > ULP_BOUND
