"""Sanity checks of the reference harness (adamjax.testing) itself.

The parity tests trust these runners to be the real Keras 3 / TF v1 Adam fed the intended
gradients; here we check that they are: the two Keras backends agree, the TF v1 runner uses the
float32 running-product beta powers, a float64 textbook epsilon-hat Adam tracks Keras, and the
ulp metric means what it says; and the pieces under them: Keras in a subprocess on another
backend, and the tutorial model.
"""

import os
import subprocess
import sys

os.environ["KERAS_BACKEND"] = "jax"  # Before Keras is first imported (conftest sets it too).

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from adamjax.testing import (  # noqa: E402
  TUTORIAL_LAYER_NAMES,
  KerasSubprocessError,
  call_in_keras_backend,
  make_gradient_sequence,
  make_params,
  max_abs_diff,
  max_ulps,
  run_keras_jax,
  run_keras_tf,
  run_tf1_adam,
  tutorial_mlp,
  ulp_distance,
)

SHAPES = {"dense/kernel": (3, 5), "bias": (7,), "conv": (2, 3, 4), "scale": ()}
STEPS = 200
FIELDS = ("params", "m", "v")


@pytest.fixture(scope="module")
def inputs():
  return make_params(SHAPES, seed=0), make_gradient_sequence(SHAPES, STEPS, seed=0)


@pytest.fixture(scope="module")
def keras_jax_eager(inputs):
  return run_keras_jax(*inputs, config={}, jit=False)


@pytest.fixture(scope="module")
def keras_tf(inputs):
  return run_keras_tf(*inputs, config={})


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------


def test_gradient_sequence_spans_the_range_and_is_reproducible():
  grads = make_gradient_sequence(SHAPES, 1000, seed=3)
  assert sorted(grads) == sorted(SHAPES)
  for name, shape in SHAPES.items():
    assert grads[name].shape == (1000, *shape)
    assert grads[name].dtype == np.float32
  flat = np.concatenate([g.reshape(1000, -1) for g in grads.values()], axis=1)
  magnitude = np.abs(flat[flat != 0])
  assert magnitude.min() >= np.float32(1e-8) and magnitude.max() <= np.float32(1e2)
  assert magnitude.min() < 1e-7 and magnitude.max() > 10.0
  assert 0.01 < np.mean(flat == 0) < 0.1
  assert (flat > 0).any() and (flat < 0).any()
  # Some elements only ever see tiny gradients, so sqrt(v) stays near eps there.
  assert (np.abs(flat).max(axis=0) < 1e-5).any()
  # Some steps are quiet: every gradient tiny.
  assert (np.abs(flat).max(axis=1) <= 1e-6).any()
  again = make_gradient_sequence(dict(reversed(SHAPES.items())), 1000, seed=3)
  assert all(np.array_equal(grads[k], again[k]) for k in SHAPES)
  params = make_params(SHAPES, seed=3)
  assert {k: (p.shape, p.dtype) for k, p in params.items()} == {
    k: (s, np.float32) for k, s in SHAPES.items()
  }


# --------------------------------------------------------------------------------------------
# ulp_distance
# --------------------------------------------------------------------------------------------


def test_ulp_distance_basic_properties():
  rng = np.random.default_rng(0)
  x = (rng.standard_normal(1000) * 10.0 ** rng.uniform(-30, 30, 1000)).astype(np.float32)
  up = np.nextafter(x, np.float32(np.inf))
  assert ulp_distance(x, x).dtype == np.int64
  assert (ulp_distance(x, x) == 0).all()
  assert (ulp_distance(x, up) == 1).all()
  assert (ulp_distance(up, x) == 1).all()
  y = rng.permutation(x)
  np.testing.assert_array_equal(ulp_distance(x, y), ulp_distance(y, x))
  assert ulp_distance(np.float32(1.0), np.float32(2.0)) == 2**23
  assert ulp_distance(np.float32(1.0), np.float32(2.0)).shape == ()
  assert ulp_distance(x[:, None], x[None, :3]).shape == (1000, 3)


def test_ulp_distance_across_zero_and_specials():
  f = np.float32
  tiny = np.nextafter(f(0), f(1))  # smallest positive subnormal
  assert ulp_distance(f(0.0), f(-0.0)) == 0
  assert ulp_distance(f(0.0), tiny) == 1
  assert ulp_distance(f(-0.0), tiny) == 1
  assert ulp_distance(-tiny, tiny) == 2
  assert ulp_distance(f(-1.0), f(1.0)) == 2 * ulp_distance(f(0.0), f(1.0))
  biggest = np.finfo(np.float32).max
  assert ulp_distance(biggest, f(np.inf)) == 1
  assert ulp_distance(f(np.nan), f(np.nan)) == 0
  assert ulp_distance(f(np.nan), f(1.0)) == np.iinfo(np.int64).max
  with pytest.raises(TypeError):
    ulp_distance(np.float32(1.0), np.float64(1.0))
  assert (
    max_ulps(
      {"a": np.array([1.0, 2.0], np.float32)},
      {"a": np.nextafter(np.array([1.0, 2.0], np.float32), np.float32(3))},
    )
    == 1
  )


def test_import_adamjax_leaves_the_testing_package_and_keras_unloaded():
  code = (
    "import sys, adamjax\n"
    "loaded = [m for m in sys.modules if m == 'adamjax.testing' or m.split('.')[0] in "
    "('keras', 'tensorflow', 'torch')]\n"
    "assert not loaded, loaded\n"
    "import adamjax.testing\n"
    "loaded = [m for m in sys.modules if m.split('.')[0] in ('keras', 'tensorflow', 'torch')]\n"
    "assert not loaded, loaded\n"
  )
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]


def test_max_ulps_and_max_abs_diff_over_trees():
  f = np.float32
  a = {"w": np.array([1.0, -2.0], f), "inner": [np.array(0.5, f), np.zeros((0,), f)]}
  b = {"w": np.array([1.0, -2.0], f), "inner": [np.nextafter(f(0.5), f(1)), np.zeros((0,), f)]}
  b["w"][1] = np.nextafter(np.nextafter(f(-2.0), f(-3)), f(-3))
  assert max_ulps(a, b) == 2
  assert max_ulps(a, a) == 0
  assert max_abs_diff(a, b) == pytest.approx(2.0 * 2**-22)
  assert max_ulps({}, {}) == 0
  with pytest.raises(ValueError):
    max_ulps({"w": a["w"]}, {"v": a["w"]})


# --------------------------------------------------------------------------------------------
# Keras on another backend, in a subprocess
# --------------------------------------------------------------------------------------------

WORKER = """
import os
import sys

import numpy as np


def describe(arrays, spec):
  import keras

  return {
    "backend": np.asarray(keras.backend.backend()),
    "adamjax_loaded": np.asarray("adamjax" in sys.modules),
    "doubled": keras.ops.convert_to_numpy(keras.ops.multiply(arrays["x"], spec["factor"])),
    "flags": arrays["flags"],
  }


def fail(arrays, spec):
  raise ValueError("the worker refuses: " + spec["why"])


def switch_backend(arrays, spec):
  os.environ["KERAS_BACKEND"] = "numpy"
  import keras

  return {"backend": np.asarray(keras.backend.backend())}
"""


@pytest.fixture
def worker(tmp_path):
  path = tmp_path / "worker.py"
  path.write_text(WORKER)
  return path


def test_call_in_keras_backend_runs_the_function_there(worker):
  x = np.arange(6, dtype=np.float32).reshape(2, 3)
  flags = np.array([True, False])
  out = call_in_keras_backend(
    "tensorflow", worker, "describe", {"x": x, "flags": flags}, {"factor": 2.0}
  )
  assert str(out["backend"]) == "tensorflow"
  # The worker file is loaded by path, and the child machinery imports nothing of adamjax.
  assert not bool(out["adamjax_loaded"])
  assert out["doubled"].dtype == np.float32
  np.testing.assert_array_equal(out["doubled"], 2 * x)
  np.testing.assert_array_equal(out["flags"], flags)


def test_call_in_keras_backend_reports_the_child_traceback(worker):
  with pytest.raises(KerasSubprocessError, match="the worker refuses: on purpose") as info:
    call_in_keras_backend("tensorflow", worker, "fail", {}, {"why": "on purpose"})
  assert "Traceback" in str(info.value) and "KERAS_BACKEND=tensorflow" in str(info.value)


def test_call_in_keras_backend_checks_the_backend_keras_ran_on(worker):
  with pytest.raises(KerasSubprocessError, match="ran Keras on 'numpy', not 'tensorflow'"):
    call_in_keras_backend("tensorflow", worker, "switch_backend")


# --------------------------------------------------------------------------------------------
# The tutorial model
# --------------------------------------------------------------------------------------------


def test_tutorial_mlp_is_the_tutorials_model_with_stable_names():
  import keras

  first, second = tutorial_mlp(keras), tutorial_mlp(keras, hidden=16, dropout_rate=0.5)
  for model, hidden, rate in ((first, 128, 0.2), (second, 16, 0.5)):
    assert tuple(layer.name for layer in model.layers) == TUTORIAL_LAYER_NAMES
    assert [type(layer).__name__ for layer in model.layers] == [
      "Flatten",
      "Dense",
      "Dropout",
      "Dense",
    ]
    shapes = {
      f"{layer.name}/{v.name}": tuple(v.shape) for layer in model.layers for v in layer.weights
    }
    assert shapes == {
      "dense/kernel": (784, hidden),
      "dense/bias": (hidden,),
      "dense_1/kernel": (hidden, 10),
      "dense_1/bias": (10,),
    }
    assert model.layers[1].activation is keras.activations.relu
    assert model.layers[3].activation is keras.activations.linear
    assert model.layers[2].rate == rate
    assert model.loss.from_logits
    assert np.all(model.layers[1].bias.numpy() == 0)
  assert isinstance(first.optimizer, keras.optimizers.Adam)
  assert float(first.optimizer.learning_rate.numpy()) == pytest.approx(1e-3)


# --------------------------------------------------------------------------------------------
# Keras 3
# --------------------------------------------------------------------------------------------


def test_keras_trajectory_layout(inputs, keras_jax_eager, keras_tf):
  params, grads = inputs
  for traj in (keras_jax_eager, keras_tf):
    assert traj.v_hat is None
    for field in FIELDS:
      arrays = getattr(traj, field)
      assert sorted(arrays) == sorted(SHAPES)
      for name, shape in SHAPES.items():
        assert arrays[name].shape == (STEPS, *shape), (field, name)
        assert arrays[name].dtype == np.float32, (field, name)
    np.testing.assert_array_equal(traj.extra["iterations"], np.arange(1, STEPS + 1))
    # Recorded per step, not aliased to the final value: the first moment after step 1
    # is exactly (1 - beta_1) * g_1 with 1 - 0.9 rounded to 0.1f, as Keras does.
    for name in SHAPES:
      np.testing.assert_array_equal(traj.m[name][0], grads[name][0] * np.float32(0.1))
      assert not np.array_equal(traj.params[name][0], params[name])


def test_keras_jax_eager_matches_keras_tf(keras_jax_eager, keras_tf):
  # Op-by-op JAX and TF's CPU kernels round each operation the same way, pow included, so on
  # x86-64 the two agree bit for bit (the README's parity table, `benchmarks.parity_report`).
  # The bound allows for a different CPU's pow; it is far below what the jitted path drifts.
  for field in FIELDS:
    assert max_ulps(getattr(keras_jax_eager, field), getattr(keras_tf, field)) <= 2, field


def test_keras_jax_jit_and_amsgrad_records_velocity_hat(inputs):
  params, grads = inputs
  short = {k: g[:20] for k, g in grads.items()}
  eager = run_keras_jax(params, short, {"amsgrad": True}, jit=False)
  jitted = run_keras_jax(params, short, {"amsgrad": True}, jit=True)
  for traj in (eager, jitted):
    assert traj.v_hat is not None and sorted(traj.v_hat) == sorted(SHAPES)
    for name in SHAPES:
      np.testing.assert_array_equal(traj.v_hat[name], np.maximum.accumulate(traj.v[name], axis=0))
  # Under jit XLA contracts multiply-adds, so the two differ in the last bits (the parity
  # tests measure by how much); here only that they run the same algorithm.
  for field in (*FIELDS, "v_hat"):
    for name in SHAPES:
      np.testing.assert_allclose(
        getattr(jitted, field)[name],
        getattr(eager, field)[name],
        rtol=1e-4,
        atol=1e-6,
        err_msg=f"{field} {name}",
      )


def _textbook_eps_hat_adam(params, grads, lr, b1, b2, eps, power_b1, power_b2):
  """Kingma & Ba with the epsilon-hat form (the formula before their section 2.1), float64.

  The moments use `b1`, `b2`; the bias corrections use `power_b1 ** t`, `power_b2 ** t`.
  Returns params, m and v after each step, and m_abs, the first moment of |g|, which bounds
  the rounding error of m where g changes sign and m cancels towards zero.
  """
  out = {"params": {}, "m": {}, "v": {}, "m_abs": {}}
  for name, p in params.items():
    theta, m, v, m_abs = (np.asarray(p, np.float64), 0.0, 0.0, 0.0)
    rows = {key: [] for key in out}
    for t, g in enumerate(np.asarray(grads[name], np.float64), start=1):
      m = b1 * m + (1 - b1) * g
      v = b2 * v + (1 - b2) * g * g
      m_abs = b1 * m_abs + (1 - b1) * np.abs(g)
      alpha = lr * np.sqrt(1 - power_b2**t) / (1 - power_b1**t)
      theta = theta - alpha * m / (np.sqrt(v) + eps)
      for key, value in zip(out, (theta, m, v, m_abs), strict=True):
        rows[key].append(value)
    for key in out:
      out[key][name] = np.stack(rows[key])
  return out


def _error_over_bound(traj, ref, steps):
  """Largest |float32 - float64| / bound over all elements of params, m and v.

  The bound is 80 float32 roundings (8 per step over 10 steps) of the scale that limits each
  quantity's error: v itself; for m the moment of |g| (m cancels where g changes sign); for the
  params |theta| plus the distance travelled (eps-hat Adam moves a parameter <~ lr a step).
  """
  u = np.finfo(np.float32).eps
  worst = 0.0
  for name, shape in SHAPES.items():
    k = {f: getattr(traj, f)[name][:steps].astype(np.float64) for f in FIELDS}
    travelled = (1e-3 * np.arange(1, steps + 1)).reshape((steps,) + (1,) * len(shape))
    scale = {
      "v": ref["v"][name],
      "m": ref["m_abs"][name],
      "params": np.abs(ref["params"][name]) + travelled,
    }
    for f in FIELDS:
      bound = 8 * steps * u * scale[f] + 1e-45  # + 1e-45: exact zeros (g = 0 at step 1)
      worst = max(worst, float(np.max(np.abs(k[f] - ref[f][name]) / bound)))
  return worst


def test_keras_tracks_float64_textbook_eps_hat_adam(inputs, keras_jax_eager):
  params, grads = inputs
  steps = 10
  first = {k: g[:steps] for k, g in grads.items()}
  # Keras takes 1 - beta in double (1 - 0.999 = 0.001) but rounds beta to float32 before
  # the powers, so the float64 reference does the same; mixing them up is a 1.3e-5 relative
  # error in v and in 1 - beta_2 ** t.
  hyper = dict(
    lr=1e-3, b1=0.9, b2=0.999, power_b1=float(np.float32(0.9)), power_b2=float(np.float32(0.999))
  )
  ref = _textbook_eps_hat_adam(params, first, eps=float(np.float32(1e-7)), **hyper)
  # Observed: 0.03 of the bound (at most 2.5 float32 roundings of the scale).
  assert _error_over_bound(keras_jax_eager, ref, steps) < 1.0
  # The check has teeth: eps 10% off (felt only where |g| stays near eps) breaks it
  # (observed 30 times the bound).
  wrong_eps = _textbook_eps_hat_adam(params, first, eps=1.1e-7, **hyper)
  assert _error_over_bound(keras_jax_eager, wrong_eps, steps) > 10.0


def test_keras_tf_worker_failure_reports_stderr(inputs):
  params, grads = inputs
  with pytest.raises(RuntimeError, match="not_an_adam_argument"):
    run_keras_tf(params, {k: g[:2] for k, g in grads.items()}, {"not_an_adam_argument": 1.0})


# --------------------------------------------------------------------------------------------
# TF v1
# --------------------------------------------------------------------------------------------


def test_tf1_adam_uses_float32_running_product_and_apply_adam_order(inputs):
  params, grads = inputs
  lr, b1, b2, eps = np.float32(1e-3), np.float32(0.9), np.float32(0.999), np.float32(1e-8)
  traj = run_tf1_adam(params, grads, learning_rate=1e-3, beta1=0.9, beta2=0.999, epsilon=1e-8)
  b1_power = [b1]
  b2_power = [b2]
  for _ in range(STEPS):
    b1_power.append(b1_power[-1] * b1)
    b2_power.append(b2_power[-1] * b2)
  # After step t the accumulators hold beta**(t+1), built by t float32 multiplies.
  np.testing.assert_array_equal(traj.extra["beta1_power"], np.array(b1_power[1:], np.float32))
  np.testing.assert_array_equal(traj.extra["beta2_power"], np.array(b2_power[1:], np.float32))
  # ...which is not float32 pow: the two differ in the last bits on many steps.
  pow_b1 = np.power(b1, np.arange(2, STEPS + 2, dtype=np.float32))
  assert (traj.extra["beta1_power"] != pow_b1).any()

  # The CPU ApplyAdam kernel's order (training_ops.cc), one float32 rounding per operation.
  # Observed: 0 ulps over these 200 steps and over 1000 steps (seeds 0, 1).
  one = np.float32(1)
  expect = {f: {} for f in FIELDS}
  for name in SHAPES:
    theta, m, v = params[name], np.zeros_like(params[name]), np.zeros_like(params[name])
    rows = {f: [] for f in FIELDS}
    for t in range(STEPS):
      g = grads[name][t]
      alpha = lr * np.sqrt(one - b2_power[t]) / (one - b1_power[t])
      m = m + (g - m) * (one - b1)
      v = v + (g * g - v) * (one - b2)
      theta = theta - (m * alpha) / (np.sqrt(v) + eps)
      for f, value in zip(FIELDS, (theta, m, v), strict=True):
        rows[f].append(value)
    for f in FIELDS:
      expect[f][name] = np.stack(rows[f])
  for f in FIELDS:
    assert max_ulps(getattr(traj, f), expect[f]) <= 2, f
