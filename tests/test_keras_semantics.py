"""Keras 3's documented optimizer behaviour, through keras_adam / keras_adamw and the real Keras.

Each test is one expectation of Keras's own tests (`keras/src/optimizers/adam_test.py`,
`adamw_test.py`, `optimizer_test.py`): run on `keras.optimizers.Adam`/`AdamW` (in process, JAX
backend, `apply_gradients` eagerly) and on the adamjax preset with the same arguments; both
must meet Keras's stated expectation, and adamjax must equal Keras bit for bit.
"""

import jax.numpy as jnp
import keras
import numpy as np
import optax
import pytest

import adamjax


def _keras_run(optimizer, variables, grads_per_step):
  """Applies `grads_per_step` (a list of lists) with a Keras optimizer; returns the values."""
  variables = [keras.Variable(np.asarray(v, np.float32), name=n) for n, v in variables.items()]
  for grads in grads_per_step:
    optimizer.apply_gradients(
      list(zip([np.asarray(g, np.float32) for g in grads], variables, strict=True))
    )
  return [np.asarray(v.value) for v in variables]


def _ours_run(tx, variables, grads_per_step):
  params = {n: jnp.asarray(v, jnp.float32) for n, v in variables.items()}
  state = tx.init(params)
  for grads in grads_per_step:
    g = {n: jnp.asarray(x, jnp.float32) for n, x in zip(params, grads, strict=True)}
    updates, state = tx.update(g, state, params)
    params = optax.apply_updates(params, updates)
  return [np.asarray(v) for v in params.values()]


def _both(kwargs, variables, grads_per_step, adamw=False, atol=0.0):
  keras_cls = keras.optimizers.AdamW if adamw else keras.optimizers.Adam
  ours_fn = adamjax.keras_adamw if adamw else adamjax.keras_adam
  theirs = _keras_run(keras_cls(**kwargs), variables, grads_per_step)
  ours = _ours_run(ours_fn(**kwargs), variables, grads_per_step)
  for a, b in zip(ours, theirs, strict=True):
    np.testing.assert_allclose(a, b, rtol=0, atol=atol)
  return ours


@pytest.mark.parametrize(
  "adamw,expected", [(False, [0.5, 1.5, 2.5, 3.5]), (True, [0.498, 1.496, 2.494, 3.492])]
)
def test_single_step(adamw, expected):
  (x,) = _both({"learning_rate": 0.5}, {"v": [1.0, 2.0, 3.0, 4.0]}, [[[1.0, 6.0, 7.0, 2.0]]], adamw)
  np.testing.assert_allclose(x, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("adamw", [False, True])
def test_weight_decay_with_exclusion_by_name(adamw):
  # Keras's test decays var1 once per optimizer (three of them) and never the excluded one.
  var1 = np.float32(2.0)
  for _ in range(3):
    (var1,) = _both({"learning_rate": 1.0, "weight_decay": 0.004}, {"var1": var1}, [[0.0]], adamw)
  np.testing.assert_allclose(var1, 1.9760959, atol=1e-6)
  optimizer = (keras.optimizers.AdamW if adamw else keras.optimizers.Adam)(1.0, weight_decay=0.004)
  optimizer.exclude_from_weight_decay(var_names=["exclude"])
  theirs = _keras_run(optimizer, {"exclude": 2.0}, [[0.0]])
  tx = (adamjax.keras_adamw if adamw else adamjax.keras_adam)(
    1.0, weight_decay=0.004, exclude_from_weight_decay=["exclude"]
  )
  assert _ours_run(tx, {"exclude": 2.0}, [[0.0]]) == theirs == [2.0]


def test_amsgrad_golden():
  golden = [[0.999], [0.9982], [0.9974], [0.9965], [0.9955]]
  grads = [[np.full(10, 0.01)]] + [[np.arange(0.1, 1.1, 0.1)]] * 4
  for steps, row in enumerate(golden, start=1):
    (x,) = _both({"amsgrad": True}, {"x": np.ones(10)}, grads[:steps])
    np.testing.assert_allclose(x, np.tile(row, 10), rtol=5e-4, atol=5e-4)


def test_adamw_golden():
  golden = [
    [0.4998] * 10,
    [0.2486, 0.2475, 0.2463, 0.2451, 0.244, 0.2428, 0.2417, 0.2405, 0.2394, 0.2382],
    [0.1223, 0.1198, 0.1174, 0.1149, 0.1124, 0.11, 0.1075, 0.1051, 0.1027, 0.1003],
    [0.0586, 0.0549, 0.0512, 0.0475, 0.0439, 0.0402, 0.0366, 0.033, 0.0294, 0.0258],
    [0.0263, 0.0215, 0.0167, 0.012, 0.0073, 0.0026, -0.0021, -0.0067, -0.0113, -0.0159],
  ]
  grads = [[np.full(10, 0.01)]] + [[np.arange(0.1, 1.1, 0.1)]] * 4
  kwargs = {"learning_rate": 1.0, "weight_decay": 0.5, "epsilon": 2.0}
  # Keras assigns twice per step (decay, then the step) and optax adds one update: exact unless
  # a parameter moves by more than half its magnitude, as here (x halves each step), where the
  # result is within an ulp of the step (keras_adam's documented limit).
  (x,) = _both(kwargs, {"x": np.ones(10)}, grads, adamw=True, atol=1e-8)
  np.testing.assert_allclose(x, golden[-1], rtol=5e-4, atol=5e-4)


@pytest.mark.parametrize("option,expected", [("clipnorm", [2**0.5 / 2] * 2), ("clipvalue", [1, 1])])
def test_clip_options_take_integers(option, expected):
  # Keras's test passes clipnorm=1 and clipvalue=1 (integers); the step uses the clipped grad.
  optimizer = keras.optimizers.Adam(**{option: 1})
  np.testing.assert_allclose(optimizer._clip_gradients([np.array([100.0, 100.0])])[0], expected)
  _both({option: 1, "learning_rate": 0.1}, {"w": [1.0, 2.0]}, [[[100.0, 100.0]]] * 3)


def test_ema_first_step_copies_then_averages():
  kwargs = {"learning_rate": 1.0, "use_ema": True, "ema_momentum": 0.9}
  grads = [[[0.1, 0.2]]] * 2
  v1 = _both({"learning_rate": 1.0}, {"var": [1.0, 2.0]}, grads[:1])[0]
  v2 = _both({"learning_rate": 1.0}, {"var": [1.0, 2.0]}, grads)[0]
  tx = adamjax.keras_adam(**kwargs)
  params = {"var": jnp.array([1.0, 2.0])}
  state = tx.init(params)
  averages = []
  for g in grads:
    updates, state = tx.update({"var": jnp.asarray(g[0])}, state, params)
    params = optax.apply_updates(params, updates)
    averages.append(np.asarray(adamjax.ema_params(state)["var"]))
  np.testing.assert_array_equal(averages[0], v1)
  np.testing.assert_allclose(averages[1], 0.9 * v1 + 0.1 * v2, rtol=1e-6)
  optimizer = keras.optimizers.Adam(**kwargs)
  var = keras.Variable(np.array([1.0, 2.0], np.float32))
  for g in grads:
    optimizer.apply_gradients([(np.asarray(g[0], np.float32), var)])
  np.testing.assert_array_equal(averages[1], optimizer._model_variables_moving_average[0].value)


def test_ema_overwrite_frequency():
  kwargs = {"learning_rate": 1.0, "use_ema": True, "ema_momentum": 0.9}
  grads = [[[0.1, 0.2]]] * 2
  v1 = _both({"learning_rate": 1.0}, {"var": [1.0, 2.0]}, grads[:1])[0]
  v2 = _both({"learning_rate": 1.0}, {"var": [1.0, 2.0]}, grads)[0]
  (first,) = _both(kwargs | {"ema_overwrite_frequency": 2}, {"var": [1.0, 2.0]}, grads[:1])
  np.testing.assert_array_equal(first, v1)  # not overwritten yet
  (second,) = _both(kwargs | {"ema_overwrite_frequency": 2}, {"var": [1.0, 2.0]}, grads)
  np.testing.assert_allclose(second, 0.9 * v1 + 0.1 * v2, rtol=1e-6)  # overwritten


def test_adamw_weight_decay_none_is_refused_as_keras():
  message = "Argument `weight_decay` must be a float. Received: weight_decay=None"
  with pytest.raises(ValueError, match=message):
    keras.optimizers.AdamW(learning_rate=1.0, weight_decay=None)
  with pytest.raises(ValueError, match=message):
    adamjax.keras_adamw(learning_rate=1.0, weight_decay=None)


def test_callable_learning_rate_without_arguments():
  # optimizer_test.py's test_callable_learning_rate (there with SGD): Keras calls it with none.
  grads = [[[[1.0, 1.0], [1.0, 1.0]]]] * 3
  variables = {"v": [[1.0, 2.0], [3.0, 4.0]]}
  x = _both({"learning_rate": lambda: 0.1}, variables, grads)
  assert np.all(x[0] < np.asarray(variables["v"]))
  tx = adamjax.keras_adam(learning_rate=lambda: 0.1)
  state = tx.init(jnp.ones(2))
  _, state = tx.update(jnp.ones(2), state, jnp.ones(2))
  assert int(optax.tree_utils.tree_get(state, "count")) == 1  # iterations


def test_learning_rate_schedule_gets_the_iteration():
  schedule = keras.optimizers.schedules.ExponentialDecay(0.1, decay_steps=2, decay_rate=0.5)
  _both({"learning_rate": schedule}, {"w": [1.0, -2.0]}, [[[0.5, -0.25]]] * 4)


def test_negative_weight_decay_and_learning_rate_are_taken_as_given():
  # Keras checks neither; neither does adamjax's Keras preset (the decay then grows weights).
  (grown,) = _both({"learning_rate": 0.1, "weight_decay": -0.5}, {"w": [1.0, 2.0]}, [[[0.0, 0.0]]])
  np.testing.assert_allclose(grown, [1.05, 2.1], rtol=1e-6)
  _both({"learning_rate": -0.1}, {"w": [1.0, 2.0]}, [[[0.5, -0.5]]] * 2)
