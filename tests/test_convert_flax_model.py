"""``adamjax.convert.flax_model``: the model graph, the API around it, and what it refuses.

Per-layer numerics are in ``test_convert_layers_*.py`` and whole models in ``test_convert_zoo.py``;
this file checks the graph runner (Functional graphs with shared layers, nested models, several
inputs and outputs, a node's own ``training`` argument), regularization losses and constraints
against Keras, configs the converter refuses, and the formats around the model (weights-only
files with ``model_config``, models compiled with other optimizers, never-stepped optimizers,
``to-jax`` directories rebuilt).
"""

from __future__ import annotations

import copy
import json
import zipfile

import jax
import keras
import numpy as np
import pytest
from flax import nnx

from adamjax import convert
from adamjax.convert import ConversionError

RNG = np.random.default_rng(0)


@pytest.fixture(autouse=True)
def _keras_broadcasts():
  """Keras adds biases by implicit rank promotion, which conftest makes an error; the converted
  modules are checked under "raise" in the per-layer tests."""
  with jax.numpy_rank_promotion("allow"):
    yield


def _x(*shape):
  return RNG.normal(size=shape).astype(np.float32)


def _assert_same(expected, got):
  expected = expected if isinstance(expected, (list, tuple)) else [expected]
  got = got if isinstance(got, (list, tuple)) else [got]
  assert len(expected) == len(got)
  for e, g in zip(expected, got, strict=True):
    np.testing.assert_array_equal(np.asarray(g), np.asarray(e))


def _multi_io_model():
  layers = keras.layers
  a, b = keras.Input((3,), name="a"), keras.Input((3,), name="b")
  shared = layers.Dense(3, activation="relu", name="shared")
  inner = keras.Sequential([layers.Dense(4), layers.BatchNormalization(), layers.Dense(2)])
  x = layers.Dense(3)(shared(a))
  y = inner(x, training=False)  # the nested model always runs in inference
  z = inner(shared(b))
  return keras.Model([a, b], [y, layers.Concatenate()([y, z])])


def test_functional_graph_with_shared_nested_and_several_io(tmp_path):
  model = _multi_io_model()
  model.compile(optimizer="adam", loss="mse")
  path = tmp_path / "m.keras"
  model.save(path)
  ours = convert.flax_model(path)
  inputs = [_x(5, 3), _x(5, 3)]
  _assert_same(model(inputs), ours(*inputs))
  # Keras's attribute paths: the nested Sequential is a nested module.
  params = nnx.to_pure_dict(nnx.state(ours, nnx.Param))
  assert set(params) == {"dense", "dense_1", "sequential"}  # Keras's class-based names
  assert set(params["sequential"]) == {"dense", "batch_normalization", "dense_1"}
  assert set(params["sequential"]["batch_normalization"]) == {"scale", "bias"}


def test_node_training_argument_holds_unless_the_call_gives_one(tmp_path):
  """``inner(x, training=False)`` in the config: inference BatchNorm under ``model(x)`` even
  after the statistics move, but an explicit ``training=True`` overrides it, as in Keras."""
  model = _multi_io_model()
  model.compile(optimizer="adam", loss="mse")
  bn = next(la for la in model.layers if isinstance(la, keras.Sequential)).layers[1]
  bn.moving_mean.assign(_x(4))
  bn.moving_variance.assign(np.abs(_x(4)) + 0.5)
  path = tmp_path / "m.keras"
  model.save(path)
  inputs = [_x(5, 3), _x(5, 3)]
  _assert_same(model(inputs), convert.flax_model(path)(*inputs))
  _assert_same(model(inputs, training=False), convert.flax_model(path)(*inputs, training=False))
  expected = model(inputs, training=True)
  got = convert.flax_model(path)(*inputs, training=True)
  for e, g in zip(expected, got, strict=True):
    np.testing.assert_allclose(np.asarray(g), np.asarray(e), rtol=2e-6, atol=2e-6)
  assert not np.allclose(np.asarray(expected[0]), np.asarray(model(inputs)[0]))


def test_regularization_losses_and_constraints_match_keras(tmp_path):
  layers, reg, con = keras.layers, keras.regularizers, keras.constraints
  model = keras.Sequential(
    [
      keras.Input((6,)),
      layers.Dense(
        5,
        kernel_regularizer=reg.L1L2(l1=0.01, l2=0.02),
        bias_regularizer="l2",
        activity_regularizer=reg.L2(0.003),
        kernel_constraint=con.MaxNorm(0.5),
      ),
      layers.Dense(
        4,
        kernel_regularizer=reg.OrthogonalRegularizer(0.05, mode="columns"),
        kernel_constraint=con.MinMaxNorm(0.2, 0.7, rate=0.5),
        bias_constraint=con.NonNeg(),
      ),
      layers.Dense(3, kernel_constraint=con.UnitNorm(axis=1)),
    ]
  )
  model.compile(optimizer="adam", loss="mse")
  for w in model.weights:
    w.assign(_x(*w.shape))
  path = tmp_path / "m.keras"
  model.save(path)
  ours = convert.flax_model(path)
  x = _x(7, 6)
  out, _, activity = ours.run([x], None, training=True, rngs=None)
  model(x, training=True)
  np.testing.assert_allclose(
    float(sum(ours.losses()) + sum(activity)), float(sum(model.losses)), rtol=1e-6
  )
  ours.apply_constraints()
  for layer, keras_layer in zip(ours.iter_layers(), model.layers, strict=True):
    for name, constraint in (("kernel", keras_layer.kernel_constraint),):
      expected = constraint(keras_layer.kernel) if constraint else keras_layer.kernel
      np.testing.assert_allclose(
        np.asarray(getattr(layer, name)[...]), np.asarray(expected), rtol=1e-6, atol=1e-7
      )
  np.testing.assert_array_equal(
    np.asarray(ours.dense_1.bias[...]), np.maximum(np.asarray(model.layers[1].bias), 0)
  )


def _config(model) -> dict:
  return json.loads(json.dumps(keras.saving.serialize_keras_object(model)))


def test_every_unsupported_class_is_listed_in_one_message(tmp_path):
  model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2), keras.layers.Dense(2)])
  model.compile(optimizer="adam", loss="mse")
  path = tmp_path / "m.keras"
  model.save(path)
  config = json.loads(zipfile.ZipFile(path).read("config.json"))
  bad = copy.deepcopy(config)
  entries = bad["config"]["layers"]
  entries.insert(2, {**entries[1], "class_name": "ConvLSTM2D"})
  entries.insert(3, {**entries[1], "class_name": "Lambda"})
  entries.insert(4, {**entries[1], "module": "my_project.layers", "class_name": "Fancy"})
  with pytest.raises(ConversionError) as info:
    convert.flax_model(path, model_config=bad)
  message = str(info.value)
  assert "refusing 3 objects" in message
  for needle in ("ConvLSTM2D at $.config.layers[2]", "Lambda at $.config.layers[3]", "Fancy"):
    assert needle in message, message


def test_weights_only_file_takes_model_config(tmp_path):
  model = keras.Sequential(
    [keras.Input((5, 4)), keras.layers.GRU(3, return_sequences=True), keras.layers.Dense(2)]
  )
  model.compile(optimizer="adam", loss="mse")
  model.save_weights(tmp_path / "m.weights.h5")
  with pytest.raises(ConversionError, match="pass model_config"):
    convert.flax_model(tmp_path / "m.weights.h5")
  ours = convert.flax_model(tmp_path / "m.weights.h5", model_config=_config(model))
  x = _x(2, 5, 4)
  _assert_same(model(x), ours(x))


def test_model_compiled_with_sgd_converts_its_weights(tmp_path, capsys):
  model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
  model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9), loss="mse")
  model.fit(_x(8, 4), _x(8, 3), epochs=1, batch_size=4, verbose=0)
  path = tmp_path / "m.keras"
  model.save(path)
  ckpt = convert.read(path)
  assert ckpt.optimizer is None and ckpt.dropped_optimizer == "SGD"
  assert any("compiled with SGD" in note for note in ckpt.notes)
  from adamjax.convert.__main__ import main

  assert main(["to-jax", str(path), str(tmp_path / "out")]) == 0
  assert "optimizer: SGD (its state is not carried over)" in capsys.readouterr().out
  x = _x(2, 4)
  _assert_same(model(x), convert.flax_model(tmp_path / "out")(x))
  assert convert.read(tmp_path / "out").dropped_optimizer == "SGD"


def test_never_stepped_optimizer_is_zero_state_at_iteration_zero(tmp_path):
  model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
  model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
  path = tmp_path / "m.keras"
  model.save(path)
  ckpt = convert.read(path)
  assert ckpt.optimizer.iterations == 0 and ckpt.optimizer.learning_rate == np.float32(0.01)
  ours = convert.flax_model(ckpt)
  params = nnx.to_pure_dict(nnx.state(ours, nnx.Param))
  tx = convert.keras_optimizer(ckpt)
  state = convert.adam_state(ckpt, tx, params)
  assert all(not np.any(np.asarray(leaf)) for leaf in jax.tree.leaves(state))


def test_to_jax_directory_rebuilds_the_model(tmp_path):
  model = keras.Sequential(
    [
      keras.Input((6,)),
      keras.layers.Normalization(mean=0.5, variance=4.0),
      keras.layers.Dense(4, activation="relu"),
      keras.layers.Dense(2),
    ]
  )
  model.compile(optimizer="adam", loss="mse")
  model.fit(_x(8, 6), _x(8, 2), epochs=1, batch_size=4, verbose=0)
  path = tmp_path / "m.keras"
  model.save(path)
  convert.save_converted(convert.read(path), tmp_path / "out")
  rebuilt = convert.flax_model(tmp_path / "out")
  x = _x(3, 6)
  _assert_same(model(x), rebuilt(x))
  # Normalization's statistics are batch statistics, not parameters.
  assert "normalization" not in nnx.to_pure_dict(nnx.state(rebuilt, nnx.Param))


def _functional_config(tmp_path):
  a = keras.Input((3,), name="a")
  h = keras.layers.Dense(4, name="h")(a)
  y = keras.layers.Dense(2, name="y")(h)
  model = keras.Model(a, y)
  model.compile(optimizer="adam", loss="mse")
  model.save(tmp_path / "m.keras")
  return json.loads(zipfile.ZipFile(tmp_path / "m.keras").read("config.json"))


def _history(config, layer):
  node = next(e for e in config["config"]["layers"] if e["name"] == layer)["inbound_nodes"][0]
  return node["args"][0]["config"]["keras_history"]


@pytest.mark.parametrize(
  "mutate, message",
  [
    (lambda c: _history(c, "h").__setitem__(0, "y"), "cycle"),
    (lambda c: _history(c, "y").__setitem__(0, "nowhere"), "not in the model"),
    (lambda c: _history(c, "y").__setitem__(1, 7), "has no node 7"),
    (lambda c: c["config"]["layers"][1]["config"].__setitem__("activation", "evil"), "evil"),
    (lambda c: c["config"]["layers"][2]["config"].__setitem__("use_bias", False), "variables"),
    (
      lambda c: c["config"]["layers"][0]["config"].__setitem__("batch_shape", [None, 4]),
      r"does not run on its declared inputs: layer dense \(Dense\)",
    ),
  ],
  ids=[
    "cycle",
    "missing-layer",
    "missing-node",
    "unknown-activation",
    "bias-mismatch",
    "input-does-not-fit-kernel",
  ],
)
def test_malformed_graphs_are_refused_naming_the_problem(tmp_path, mutate, message):
  config = _functional_config(tmp_path)
  mutate(config)
  with pytest.raises(ConversionError, match=message):
    ours = convert.flax_model(tmp_path / "m.keras", model_config=config)
    ours(_x(2, 3))


def test_keras_ops_nodes_in_functional_graphs(tmp_path):
  """``keras.ops`` calls between layers, and the NotEqual mask op Keras inserts for
  ``Embedding(mask_zero=True)``, are computed as Keras's JAX backend does (values and dtypes)."""
  ops, layers = keras.ops, keras.layers
  x = keras.Input((4, 3))
  mean = ops.squeeze(ops.expand_dims(ops.add(ops.mean(x, axis=1), 1.0), -1), -1)
  summed = ops.sum(ops.transpose(x, (0, 2, 1)), axis=-1, keepdims=True)
  flat = ops.reshape(x, (-1, 12))
  outputs = [
    mean,
    summed,
    x * 2.0,
    ops.concatenate([x, x], axis=-1),
    ops.cast(x, "float16"),
    ops.matmul(x, ops.transpose(x, (0, 2, 1))),
    ops.softmax(x),
    layers.Dense(2)(flat),
  ]
  model = keras.Model(x, outputs)
  tokens = keras.Input((6,), dtype="int32")
  masked = keras.Model(tokens, layers.LSTM(3)(layers.Embedding(9, 4, mask_zero=True)(tokens)))
  for m, name in ((model, "ops"), (masked, "masked")):
    m.compile(optimizer="adam", loss="mse")
    m.save(tmp_path / f"{name}.keras")
  ours = convert.flax_model(tmp_path / "ops.keras")
  x_value = _x(2, 4, 3)
  for e, g in zip(model(x_value), ours(x_value), strict=True):
    assert np.asarray(g).dtype == np.asarray(e).dtype
    np.testing.assert_array_equal(np.asarray(g), np.asarray(e))
  ids = np.array([[1, 2, 0, 0, 0, 0], [3, 4, 5, 6, 0, 0]], np.int32)
  _assert_same(masked(ids), convert.flax_model(tmp_path / "masked.keras")(ids))


def test_tf_keras_h5_full_model_with_recurrent_and_attention_layers(tmp_path):
  """A tf-keras (Keras 2) ``.h5`` carries its config: LSTM cells, a Bidirectional wrapper, MHA
  projections and DepthwiseConv1D are found by position in its weight lists, its legacy node
  format (tensors in kwargs as ``[layer, node, tensor]``) is read, and the Adam state maps."""
  from pathlib import Path

  from adamjax.testing import call_in_keras_backend

  rng = np.random.default_rng(1)
  arrays = {
    "ids": rng.integers(0, 9, size=(4, 6)).astype(np.int32) * (np.arange(6) < 4),
    "seq": _x(4, 5, 4),
    "y": _x(4, 2),
  }
  arrays["ids"] = arrays["ids"].astype(np.int32)
  worker = Path(__file__).with_name("tf_keras_models_worker.py")
  out = call_in_keras_backend(
    "tensorflow",
    worker,
    "build_tf_keras_h5",
    arrays,
    {"out": str(tmp_path)},
    env={"TF_USE_LEGACY_KERAS": "1"},
  )
  ckpt = convert.read(tmp_path / "model.h5")
  assert ckpt.format == "tf-keras-h5" and ckpt.optimizer.iterations == 2
  ours = convert.flax_model(ckpt)
  logits = np.asarray(ours(arrays["ids"], arrays["seq"]))
  np.testing.assert_allclose(logits, out["logits"], rtol=1e-5, atol=1e-6)
  params = nnx.to_pure_dict(nnx.state(ours, nnx.Param))
  state = convert.adam_state(ckpt, convert.keras_optimizer(ckpt), params)
  mu = state[0].mu["bidirectional"]["backward_layer"]["cell"]["recurrent_kernel"]
  np.testing.assert_array_equal(
    mu, ckpt.optimizer.momentums["bidirectional", "backward_layer/cell/recurrent_kernel"]
  )


def test_wrapped_layers_regularizers_and_constraints(tmp_path):
  """Bidirectional's forward and backward layers carry their own regularizers and constraints."""
  layers = keras.layers
  model = keras.Sequential(
    [
      keras.Input((5, 3)),
      layers.Bidirectional(
        layers.LSTM(
          4,
          kernel_regularizer="l2",
          recurrent_regularizer=keras.regularizers.L1(0.02),
          kernel_constraint="non_neg",
        )
      ),
      layers.Dense(2, kernel_regularizer="l1"),
    ]
  )
  for w in model.weights:
    w.assign(_x(*w.shape))
  model.compile(optimizer="adam", loss="mse")
  model.save(tmp_path / "m.keras")
  ours = convert.flax_model(tmp_path / "m.keras")
  model(_x(2, 5, 3))
  assert len(ours.losses()) == len(model.losses) == 5
  np.testing.assert_allclose(float(sum(ours.losses())), float(sum(model.losses)), rtol=1e-6)
  ours.apply_constraints()
  for direction in (ours.bidirectional.forward_layer, ours.bidirectional.backward_layer):
    assert float(np.min(np.asarray(direction.cell.kernel[...]))) == 0.0


def test_mixed_float16_model_with_keras_loss_scaling(tmp_path):
  """Under mixed_float16, compile wraps Adam in a LossScaleOptimizer; the Adam state is its
  inner optimizer's, and the model computes in float16 with a float32 output layer."""
  keras.mixed_precision.set_global_policy("mixed_float16")
  try:
    model = keras.Sequential(
      [keras.Input((4,)), keras.layers.Dense(3), keras.layers.Dense(2, dtype="float32")]
    )
  finally:
    keras.mixed_precision.set_global_policy("float32")
  model.compile(optimizer="adam", loss="mse")
  model.fit(_x(8, 4), _x(8, 2), batch_size=4, verbose=0)
  model.save(tmp_path / "m.keras")
  ckpt = convert.read(tmp_path / "m.keras")
  assert any("LossScaleOptimizer" in note for note in ckpt.notes)
  inner = model.optimizer.inner_optimizer
  assert ckpt.optimizer.iterations == int(inner.iterations) > 0  # overflowed steps are skipped
  np.testing.assert_array_equal(
    ckpt.optimizer.momentums["dense", "kernel"], np.asarray(inner.variables[2])
  )
  ours = convert.flax_model(ckpt)
  x = _x(3, 4)
  assert ours.dense.compute_dtype == "float16"
  _assert_same(model(x), ours(x))


def test_keras_call_conventions(tmp_path):
  """Inputs in the model's input order (not the config's layer order), tensor arguments given
  by keyword, one output unpacked and dict outputs kept, Python scalars weakly typed in ops,
  and no penalty for a frozen layer's regularizer: as Keras's Functional does."""
  layers = keras.layers
  a, b = keras.Input((3,), name="a"), keras.Input((4,), name="b")
  joined = layers.Concatenate()([layers.Dense(2)(b), a])
  frozen = layers.Dense(2, kernel_regularizer="l2", trainable=False)
  order = keras.Model([a, b], [frozen(joined)])
  tokens = keras.Input((5,), dtype="int32")
  pooled = layers.GlobalAveragePooling1D()(layers.Embedding(7, 2, mask_zero=True)(inputs=tokens))
  keyword = keras.Model(tokens, {"pooled": pooled, "twice": pooled * 2.0})
  for model, name in ((order, "order"), (keyword, "keyword")):
    model.compile(optimizer="adam", loss="mse")
    model.save(tmp_path / f"{name}.keras")
  ours = convert.flax_model(tmp_path / "order.keras")
  x = [_x(2, 3), _x(2, 4)]
  out = ours(*x)
  assert not isinstance(out, list)
  _assert_same(order(x), out)
  assert ours.losses() == [] and order.losses == []
  ids = np.array([[1, 2, 0, 0, 0], [3, 0, 0, 0, 0]], np.int32)
  got, expected = convert.flax_model(tmp_path / "keyword.keras")(ids), keyword(ids)
  assert set(got) == {"pooled", "twice"}
  for key in got:
    np.testing.assert_array_equal(np.asarray(got[key]), np.asarray(expected[key]))


def _sequential_config():
  return {
    "class_name": "Sequential",
    "config": {
      "name": "s",
      "layers": [
        {"class_name": "InputLayer", "config": {"batch_shape": [None, 3], "name": "in"}},
        {"class_name": "Dense", "config": {"units": 2, "name": "d"}},
      ],
    },
  }


def _nested(depth: int, width: int) -> dict:
  """A Functional applying the model one level down ``width`` times at every level."""
  inner = {"class_name": "Identity", "config": {"name": "leaf"}}
  for level in range(depth):
    entries = [{"class_name": "InputLayer", "name": "x", "config": {"name": "x"}}]
    previous = "x"
    inner_name = f"m{level}"
    entries.append({**inner, "name": inner_name, "inbound_nodes": []})
    for i in range(width):
      ref = {"class_name": "__keras_tensor__", "config": {"keras_history": [previous, 0, 0]}}
      entries[1]["inbound_nodes"].append({"args": [ref], "kwargs": {}})
      previous = inner_name
      if i:
        entries[1]["inbound_nodes"][-1]["args"][0]["config"]["keras_history"] = [
          inner_name,
          i - 1,
          0,
        ]
    inner = {
      "class_name": "Functional",
      "config": {
        "name": f"m{level + 1}",
        "layers": entries,
        "input_layers": [["x", 0, 0]],
        "output_layers": [[inner_name, width - 1, 0]],
      },
    }
  return inner


@pytest.mark.parametrize(
  "config, message",
  [
    ([1], "not a model"),
    ({"config": {"layers": []}}, "not a model"),
    ({"class_name": "Sequential", "config": {"layers": [{"config": {}}]}}, "class names"),
    (_nested(5, 12), "layer calls"),
  ],
  ids=["root-not-object", "root-without-class", "layer-without-class", "nested-reuse-bomb"],
)
def test_hostile_model_configs_are_conversion_errors(config, message):
  from adamjax.convert._graph import KerasModel

  with pytest.raises(ConversionError, match=message):
    KerasModel(config, {})


@pytest.mark.parametrize(
  "mutate, message",
  [
    (lambda layers: layers.insert(2, dict(layers[0], name="in2")), "input inside it"),
    (
      lambda layers: layers[1]["config"].update(kernel_regularizer="l2", dtype={"config": [1]}),
      "dtype",
    ),
    (
      lambda layers: layers[1]["config"].update(
        kernel_regularizer={"class_name": "L2", "config": {"l2": 10**400}}
      ),
      "finite",
    ),
    (
      lambda layers: layers[1]["config"].update(
        kernel_constraint={"class_name": "MaxNorm", "config": {"axis": 5}}
      ),
      "axis",
    ),
  ],
  ids=["input-not-first", "policy-not-object", "huge-factor", "constraint-axis"],
)
def test_hostile_layer_options_are_conversion_errors(mutate, message):
  from adamjax.convert._graph import KerasModel

  config = _sequential_config()
  mutate(config["config"]["layers"])
  weights = {"dense": {"kernel": np.zeros((3, 2), np.float32), "bias": np.zeros(2, np.float32)}}
  with pytest.raises(ConversionError, match=message):
    KerasModel(config, weights)
