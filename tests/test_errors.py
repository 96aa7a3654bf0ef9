"""Bad input gets an error that names the problem; counters saturate; no TensorFlow at import."""

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adamjax

PRESETS = {
  "adam": adamjax.adam,
  "keras_adam": adamjax.keras_adam,
  "tf1_adam": adamjax.tf1_adam,
}

# (factory, keyword, bad value, words the message must contain)
BAD_HYPERPARAMETERS = [
  (adamjax.adam, "learning_rate", float("nan"), "finite"),
  (adamjax.adam, "b1", 1.0, "[0.0, 1.0)"),
  (adamjax.adam, "b1", jnp.asarray(0.999, jnp.bfloat16), "hyperparam_dtype=jnp.float32"),
  (adamjax.adam, "b2", np.array([0.9, 1.1]), "[0.0, 1.0)"),
  (adamjax.adam, "b2", -0.1, ">= 0"),
  (adamjax.adam, "eps", -1e-8, ">= 0"),
  (adamjax.adam, "eps_root", float("nan"), "finite"),
  (adamjax.adam, "b1", "0.9", "real number"),
  (adamjax.adam, "b1", jnp.asarray(0.9 + 0j), "real number"),
  (adamjax.adamw, "weight_decay", np.inf, "finite"),
  (adamjax.keras_adam, "learning_rate", float("-inf"), "finite"),
  (adamjax.keras_adam, "beta_1", 1.5, "[0.0, 1.0)"),
  (adamjax.keras_adam, "beta_2", 1.0, "[0.0, 1.0)"),
  (adamjax.keras_adam, "epsilon", -1e-7, ">= 0"),
  (adamjax.keras_adam, "learning_rate", "fast", "real number"),
  (adamjax.keras_adam, "beta_1", [0.9], "real number"),
  (adamjax.keras_adam, "beta_2", True, "real number"),
  (adamjax.tf1_adam, "learning_rate", float("inf"), "finite"),
  (adamjax.tf1_adam, "beta1", -0.5, ">= 0"),
  (adamjax.tf1_adam, "beta2", 1.0, "[0.0, 1.0)"),
  (adamjax.tf1_adam, "epsilon", -1.0, ">= 0"),
  (adamjax.scale_by_adam, "b1", 2.0, "[0.0, 1.0)"),
  (adamjax.scale_by_keras_adam, "epsilon", None, "real"),
  (adamjax.scale_by_tf1_adam, "beta1", object(), "real"),
  # PyTorch's own refusals ("Invalid learning rate: -0.001", ...), and it takes numbers.
  (adamjax.torch_adam, "lr", -1e-3, ">= 0"),
  (adamjax.torch_adam, "eps", -1e-8, ">= 0"),
  (adamjax.torch_adamw, "weight_decay", -0.01, ">= 0"),
  (adamjax.torch_adam, "lr", np.full(2, 1e-3), "real scalar"),
]


@pytest.mark.parametrize("factory,keyword,value,words", BAD_HYPERPARAMETERS)
def test_invalid_hyperparameter_names_argument_and_value(factory, keyword, value, words):
  kwargs = {"learning_rate": 1e-3} if factory in (adamjax.adam, adamjax.adamw) else {}
  kwargs[keyword] = value
  with pytest.raises(ValueError) as info:
    factory(**kwargs)
  message = str(info.value)
  assert keyword in message and repr(value) in message and words in message


def test_valid_edge_values_are_accepted():
  adamjax.adam(0.0, b1=0.0, b2=0.0, eps=0.0)
  adamjax.keras_adam(np.float32(1e-3), beta_1=jnp.asarray(0.9), epsilon=0)
  adamjax.tf1_adam(optax.constant_schedule(1e-3))


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_wrong_tree_structure_names_the_path(name):
  tx = PRESETS[name](learning_rate=1e-3)
  params = {"encoder": {"kernel": jnp.ones((2, 3)), "bias": jnp.zeros(3)}, "head": jnp.ones(4)}
  state = tx.init(params)
  grads = {"encoder": {"kernel": jnp.ones((2, 3)), "bais": jnp.zeros(3)}, "head": jnp.ones(4)}
  with pytest.raises(
    ValueError,
    match=r"missing \['encoder'\]\['bias'\].*"
    r"unexpected \['encoder'\]\['bais'\]",
  ):
    jax.jit(tx.update)(grads, state, params)
  with pytest.raises(ValueError, match=r"missing \['head'\]"):
    tx.update({"encoder": grads["encoder"] | {"bias": jnp.zeros(3)}}, state, params)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_wrong_shape_names_the_path_and_both_shapes(name):
  tx = PRESETS[name](learning_rate=1e-3)
  params = {"layers": [jnp.ones((2, 3)), jnp.ones((3, 1))]}
  state = tx.init(params)
  grads = {"layers": [jnp.ones((2, 3)), jnp.ones((1, 3))]}
  with pytest.raises(ValueError, match=r"\['layers'\]\[1\] has shape \(1, 3\).*expects \(3, 1\)"):
    jax.jit(tx.update)(grads, state, params)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_wrong_dtype_names_the_path(name):
  tx = PRESETS[name](learning_rate=1e-3)
  params = {"w": jnp.ones(3), "steps": jnp.ones(2)}
  state = tx.init(params)
  with pytest.raises(TypeError, match=r"\['steps'\] has dtype int32.*floating-point"):
    tx.update({"w": jnp.ones(3), "steps": jnp.ones(2, jnp.int32)}, state, params)
  with pytest.raises(TypeError, match=r"\['w'\] has dtype complex64"):
    tx.update({"w": jnp.ones(3, jnp.complex64), "steps": jnp.ones(2)}, state, params)


@pytest.mark.parametrize("factory", [adamjax.keras_adam, adamjax.tf1_adam])
def test_bfloat16_params_refused_where_beta_rounds_to_one(factory):
  with pytest.raises(ValueError, match=r"rounds to 1.0 in bfloat16"):
    factory().init({"w": jnp.ones(3, jnp.bfloat16)})


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_step_counter_saturates_at_int32_max(name):
  tx = PRESETS[name](learning_rate=1e-3)
  params = {"w": jnp.ones(4)}
  state = tx.init(params)
  top = jnp.iinfo(jnp.int32).max
  state = optax.tree_utils.tree_set(state, count=jnp.asarray(top - 1, jnp.int32))
  step = jax.jit(tx.update)
  grads = {"w": jnp.full(4, 0.5)}
  for _ in range(3):
    updates, state = step(grads, state, params)
    params = optax.apply_updates(params, updates)
    assert int(optax.tree_utils.tree_get(state, "count")) == top
    assert bool(jnp.all(jnp.isfinite(updates["w"]))) and bool(jnp.all(updates["w"] < 0))


def test_import_adamjax_does_not_import_tensorflow_or_keras():
  code = (
    "import sys, adamjax; "
    "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'keras', 'h5py')); "
    "print(bad); sys.exit(1 if bad else 0)"
  )
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
  assert result.returncode == 0, result.stdout + result.stderr
