"""Recurrent layers (adamjax.convert.layers.rnn) against Keras on the JAX backend: SimpleRNN, LSTM,
GRU (both reset_after) and Bidirectional over an option grid, with random weights, masks that
hide leading, middle and trailing steps, and non-zero initial states. Outputs (and returned
states) are compared bit for bit under jit: both sides trace the same jnp/lax ops (the cells'
steps inside ``lax.scan``, GRU's fused path, the unrolled Python loop). Dropout in training is
compared with the same masks given to both; one-step gradients (inputs and weights) are
bit-identical too; bad configs are refused with a named error.

Keras's orthogonal initializer and its bias adds broadcast by implicit rank promotion, so Keras is
run with JAX's default ``allow``; the converted modules also run under this suite's ``raise``.
"""

import jax
import jax.numpy as jnp
import keras
import numpy as np
import pytest
from flax import nnx
from layer_harness import build_module, run_both

from adamjax.convert._ir import ConversionError
from adamjax.convert.layers import LAYERS

L = keras.layers
B, T, D, U = 3, 4, 3, 5
# Row 0 hides a middle step, row 1 its first two (where the initial state shows), row 2 its tail.
MASK = np.array([[1, 1, 0, 1], [0, 0, 1, 1], [1, 0, 0, 0]], bool)


@pytest.fixture(autouse=True)
def _keras_broadcasts():
  with jax.numpy_rank_promotion("allow"):
    yield


def _x(seed=0, dtype="float32"):
  return np.random.default_rng(seed).normal(size=(B, T, D)).astype(dtype)


def _randomize(layer, seed=1):
  """Random normal weights (Keras's default biases are zeros or ones)."""
  rng = np.random.default_rng(seed)
  layer.set_weights([0.5 * rng.normal(size=w.shape).astype("float32") for w in layer.get_weights()])


def _states(n, seed=2):
  rng = np.random.default_rng(seed)
  return [rng.normal(size=(B, U)).astype("float32") for _ in range(n)]


def _n_states(layer):
  inner = layer.forward_layer if isinstance(layer, L.Bidirectional) else layer
  n = 2 if isinstance(inner, L.LSTM) else 1
  return 2 * n if isinstance(layer, L.Bidirectional) else n


def _assert_equal(expected, got):
  assert jax.tree.structure(expected) == jax.tree.structure(got)
  for e, g in zip(jax.tree.leaves(expected), jax.tree.leaves(got), strict=True):
    assert e.shape == g.shape and e.dtype == g.dtype, (e.shape, g.shape, e.dtype, g.dtype)
    np.testing.assert_array_equal(g, e)


def _stateless_both(layer, x, training=False, **kwargs):
  """As ``run_both``, but Keras runs ``stateless_call`` with its variables as jit arguments, as
  ours has them. Needed where Keras's unrolled loop is compared: with the variables baked in as
  constants (``run_both``'s Keras side), XLA may rewrite the unrolled step's dots (a few ulps)."""
  module = build_module(layer)
  graphdef, state = nnx.split(module)
  trainable = [v.value for v in layer.trainable_variables]
  non_trainable = [v.value for v in layer.non_trainable_variables]

  @jax.jit
  def keras_fn(trainable, non_trainable, x):
    return layer.stateless_call(trainable, non_trainable, x, training=training, **kwargs)[0]

  @jax.jit
  def ours(state, x):
    return nnx.merge(graphdef, state)(x, training=training, **kwargs)

  expected = jax.tree.map(np.asarray, keras_fn(trainable, non_trainable, x))
  return expected, jax.tree.map(np.asarray, ours(state, x))


def _cells():
  return {
    "simple": lambda **k: L.SimpleRNN(U, **k),
    "lstm": lambda **k: L.LSTM(U, **k),
    "gru": lambda **k: L.GRU(U, **k),
    "gru-reset-before": lambda **k: L.GRU(U, reset_after=False, **k),
  }


CELLS = list(_cells())

# (id, layer options, call options: mask and/or initial_state).
OPTIONS = [
  ("backwards-last-init", {"go_backwards": True}, {"initial_state": True}),
  ("seq-backwards-mask", {"return_sequences": True, "go_backwards": True}, {"mask": True}),
  ("state-mask-init", {"return_state": True}, {"mask": True, "initial_state": True}),
  (
    "nobias-seq-zero-output-mask",
    {"use_bias": False, "return_sequences": True, "zero_output_for_mask": True},
    {"mask": True},
  ),
  # Recurrent dropout switches LSTM and GRU to Keras's split-kernel implementation (1).
  ("recurrent-dropout-inference", {"recurrent_dropout": 0.3, "return_state": True}, {}),
]


def _call_kwargs(layer, call):
  kwargs = {}
  if call.get("mask"):
    kwargs["mask"] = MASK
  if call.get("initial_state"):
    kwargs["initial_state"] = _states(_n_states(layer))
  return kwargs


# SimpleRNN has one implementation: recurrent dropout is no-op in inference there.
GRID = [
  pytest.param(cell, options, call, id=f"{name}-{cell}")
  for name, options, call in OPTIONS
  for cell in CELLS
  if not (cell == "simple" and "recurrent_dropout" in options)
]


@pytest.mark.parametrize("cell,options,call", GRID)
def test_matches_keras(cell, options, call):
  layer = _cells()[cell](**options)
  kwargs = _call_kwargs(layer, call)
  x = _x()
  layer.build((B, T, D))
  _randomize(layer)
  expected, got = run_both(layer, x, **kwargs)
  _assert_equal(expected, got)


@pytest.mark.parametrize("cell", CELLS)
def test_unrolled_matches_keras(cell):
  """Keras's Python loop, masked from a non-zero initial state: masked steps repeat the previous
  output, zeros before the first one (LSTM and GRU also backwards)."""
  backwards = cell in ("lstm", "gru")
  layer = _cells()[cell](
    unroll=True, return_sequences=True, return_state=True, go_backwards=backwards
  )
  kwargs = _call_kwargs(layer, {"mask": True, "initial_state": True})
  x = _x(3)
  layer.build((B, T, D))
  _randomize(layer, 4)
  expected, got = _stateless_both(layer, x, **kwargs)
  _assert_equal(expected, got)
  # Outputs in processing order: row 1 starts with two masked steps, row 2 (backwards) with
  # three; they are zeros, not the initial state.
  if backwards:
    np.testing.assert_array_equal(got[0][2, :3], 0.0)
  else:
    np.testing.assert_array_equal(got[0][1, :2], 0.0)


@pytest.mark.parametrize(
  "cell,activation,recurrent_activation",
  [
    ("lstm", lambda: "relu", "hard_sigmoid"),
    # An activation layer as the activation (its config nested in the layer's).
    ("gru", lambda: L.LeakyReLU(negative_slope=0.1), "tanh"),
    ("simple", lambda: None, None),
  ],
  ids=["lstm-relu-hard_sigmoid", "gru-leaky_relu_layer-tanh", "simple-linear"],
)
def test_activations(cell, activation, recurrent_activation):
  options = {"activation": activation(), "return_sequences": True}
  if recurrent_activation is not None:
    options["recurrent_activation"] = recurrent_activation
  layer = _cells()[cell](**options)
  x = _x(5)
  layer.build((B, T, D))
  _randomize(layer, 6)
  expected, got = run_both(layer, x)
  _assert_equal(expected, got)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_implementation_1_config(cell):
  """A config that names ``implementation: 1`` (tf-keras writes it; Keras 3 takes it as a
  constructor argument but does not save it) computes Keras's split-kernel step."""
  layer = _cells()[cell](implementation=1, return_sequences=True)
  layer.build((B, T, D))
  _randomize(layer, 18)
  config = {**layer.get_config(), "implementation": 1}
  names = LAYERS[type(layer).__name__].variables(config)
  module = LAYERS[type(layer).__name__](
    config, {n: np.asarray(w) for n, w in zip(names, layer.weights, strict=True)}
  )
  assert module.implementation == 1
  graphdef, state = nnx.split(module)
  x = _x(19)
  expected = np.asarray(jax.jit(lambda x: layer(x, mask=MASK))(x))
  got = np.asarray(jax.jit(lambda s, x: nnx.merge(graphdef, s)(x, mask=MASK))(state, x))
  np.testing.assert_array_equal(got, expected)


BIDIRECTIONAL = [
  ("concat-lstm-seq", "concat", lambda: L.LSTM(U, return_sequences=True), {"mask": True}),
  ("sum-gru-last", "sum", lambda: L.GRU(U), {}),
  ("mul-simple-seq", "mul", lambda: L.SimpleRNN(U, return_sequences=True), {"mask": True}),
  ("ave-gru-before-seq", "ave", lambda: L.GRU(U, reset_after=False, return_sequences=True), {}),
  (
    "none-lstm-state-init",
    None,
    lambda: L.LSTM(U, return_sequences=True, return_state=True),
    {"mask": True, "initial_state": True},
  ),
  ("concat-gru-state", "concat", lambda: L.GRU(U, return_state=True), {"initial_state": True}),
]


@pytest.mark.parametrize(
  "merge_mode,make,call", [b[1:] for b in BIDIRECTIONAL], ids=[b[0] for b in BIDIRECTIONAL]
)
def test_bidirectional(merge_mode, make, call):
  layer = L.Bidirectional(make(), merge_mode=merge_mode)
  kwargs = _call_kwargs(layer, call)
  x = _x(7)
  layer.build((B, T, D))
  _randomize(layer, 8)
  expected, got = run_both(layer, x, **kwargs)
  _assert_equal(expected, got)


def test_bidirectional_backward_layer():
  """An explicit backward layer of another class (its config nested as backward_layer)."""
  layer = L.Bidirectional(
    L.LSTM(U, return_sequences=True),
    backward_layer=L.GRU(U, return_sequences=True, go_backwards=True, use_bias=False),
  )
  x = _x(9)
  layer.build((B, T, D))
  _randomize(layer, 10)
  module = build_module(layer)
  assert type(module.backward_layer).__name__ == "GRU"
  expected, got = run_both(layer, x, mask=MASK)
  _assert_equal(expected, got)


# (id, layer): dropout rates in (0, 1); with recurrent dropout LSTM/GRU use implementation 1,
# without it GRU takes its fused path (the input mask broadcast over time).
DROPOUT = [
  ("simple", lambda: L.SimpleRNN(U, dropout=0.3, recurrent_dropout=0.4, return_sequences=True)),
  ("lstm-impl1", lambda: L.LSTM(U, dropout=0.3, recurrent_dropout=0.4, return_sequences=True)),
  ("lstm-impl2", lambda: L.LSTM(U, dropout=0.5, return_state=True)),
  ("gru-impl1", lambda: L.GRU(U, dropout=0.3, recurrent_dropout=0.4, return_sequences=True)),
  ("gru-fused", lambda: L.GRU(U, dropout=0.5, return_sequences=True)),
  ("gru-before-impl2", lambda: L.GRU(U, reset_after=False, dropout=0.5, return_sequences=True)),
]


@pytest.mark.parametrize("make", [d[1] for d in DROPOUT], ids=[d[0] for d in DROPOUT])
def test_dropout_in_training(make):
  """The module draws its masks from ``rngs``; Keras is given the same masks (its cells cache
  them per call), so training outputs must agree bit for bit."""
  layer = make()
  x = _x(11)
  layer.build((B, T, D))
  _randomize(layer, 12)
  module = build_module(layer)
  dp, rec = module.dropout_masks(
    jnp.asarray(x[:, 0, :]), jnp.zeros((B, U)), True, nnx.Rngs(dropout=3)
  )
  # Some units dropped, the others scaled by 1 / (1 - rate).
  assert all(np.any(m == 0) and np.all((m == 0) | (m > 1)) for m in jax.tree.leaves((dp, rec)))
  graphdef, state = nnx.split(module)

  @jax.jit
  def keras_fn(x):
    layer.cell._dropout_mask = dp
    layer.cell._recurrent_dropout_mask = rec
    return layer(x, training=True)

  @jax.jit
  def ours(state, x):
    return nnx.merge(graphdef, state)(x, training=True, rngs=nnx.Rngs(dropout=3))

  expected = jax.tree.map(np.asarray, keras_fn(x))
  got = jax.tree.map(np.asarray, ours(state, x))
  _assert_equal(expected, got)


def test_dropout_needs_rngs():
  layer = L.GRU(U, dropout=0.5)
  layer.build((B, T, D))
  with pytest.raises(ValueError, match="rngs"):
    build_module(layer)(_x(), training=True)


GRADIENT = [
  ("simple", lambda: L.SimpleRNN(U, return_sequences=True), {"mask": True}),
  ("lstm", lambda: L.LSTM(U, go_backwards=True), {"initial_state": True}),
  ("gru", lambda: L.GRU(U, return_sequences=True), {}),
  ("gru-before", lambda: L.GRU(U, reset_after=False), {"mask": True}),
  ("bidirectional", lambda: L.Bidirectional(L.GRU(U, return_sequences=True)), {"mask": True}),
]


@pytest.mark.parametrize("make,call", [g[1:] for g in GRADIENT], ids=[g[0] for g in GRADIENT])
def test_gradients(make, call):
  """d sum(out**2) / d (inputs, weights), ours against Keras's stateless call with the weights as
  jit arguments on both sides: bit-identical (both differentiate the same ops)."""
  layer = make()
  kwargs = _call_kwargs(layer, call)
  x = _x(13)
  layer.build((B, T, D))
  _randomize(layer, 14)
  module = build_module(layer)
  names = LAYERS[type(layer).__name__].variables(layer.get_config())
  graphdef, state = nnx.split(module)
  trainable = [v.value for v in layer.trainable_variables]
  non_trainable = [v.value for v in layer.non_trainable_variables]

  def keras_loss(trainable, x):
    out = layer.stateless_call(trainable, non_trainable, x, **kwargs)[0]
    return jnp.sum(jax.tree.leaves(out)[0] ** 2)

  def our_loss(state, x):
    return jnp.sum(jax.tree.leaves(nnx.merge(graphdef, state)(x, **kwargs))[0] ** 2)

  expected_w, expected_x = jax.jit(jax.grad(keras_loss, argnums=(0, 1)))(trainable, x)
  got_state, got_x = jax.jit(jax.grad(our_loss, argnums=(0, 1)))(state, x)
  assert np.abs(np.asarray(got_x)).max() > 0
  np.testing.assert_array_equal(got_x, expected_x)
  got_w = nnx.to_pure_dict(got_state)
  for name, expected in zip(names, expected_w, strict=True):
    got = got_w
    for part in name.split("/"):
      got = got[part]
    np.testing.assert_array_equal(got, expected, err_msg=name)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_mixed_bfloat16(cell):
  """Variables in float32, computed in bfloat16 (inputs given in bfloat16, as the graph casts)."""
  layer = _cells()[cell](return_sequences=True, dtype="mixed_bfloat16")
  x = _x(15).astype(jnp.bfloat16)
  layer.build((B, T, D))
  _randomize(layer, 16)
  expected, got = run_both(layer, x)
  assert got.dtype == jnp.bfloat16
  _assert_equal(expected, got)


@pytest.mark.parametrize("cell", CELLS)
def test_strict_rank_promotion(cell):
  """The module broadcasts its biases explicitly: it runs where rank promotion raises."""
  layer = _cells()[cell](return_sequences=True, go_backwards=True)
  x = _x(17)
  layer.build((B, T, D))
  module = build_module(layer)
  with jax.numpy_rank_promotion("raise"):
    out = module(x, mask=MASK)
    module(x, initial_state=_states(_n_states(layer)))
  assert out.shape == (B, T, U)


@pytest.mark.parametrize("return_sequences", [False, True])
@pytest.mark.parametrize("return_state", [False, True])
def test_compute_mask(return_sequences, return_state):
  for layer in (
    L.LSTM(U, return_sequences=return_sequences, return_state=return_state),
    L.GRU(U, return_sequences=return_sequences, return_state=return_state),
    *(
      L.Bidirectional(
        L.GRU(U, return_sequences=return_sequences, return_state=return_state), merge_mode=mode
      )
      for mode in ("concat", None)
    ),
  ):
    x = _x()
    layer.build((B, T, D))
    module = build_module(layer)
    assert module.supports_masking
    expected = layer.compute_mask(x, MASK)
    got = module.compute_mask(x, MASK)
    assert jax.tree.structure(expected, is_leaf=lambda v: v is None) == jax.tree.structure(
      got, is_leaf=lambda v: v is None
    )
    for e, g in zip(jax.tree.leaves(expected), jax.tree.leaves(got), strict=True):
      np.testing.assert_array_equal(g, e)


def test_registered():
  assert {"SimpleRNN", "LSTM", "GRU", "Bidirectional"} <= set(LAYERS)


def _weights(cls, config, shapes):
  return {
    name: np.zeros(shapes[name.rsplit("/", 1)[-1]], "float32") for name in cls.variables(config)
  }


LSTM_SHAPES = {"kernel": (D, 4 * U), "recurrent_kernel": (U, 4 * U), "bias": (4 * U,)}


@pytest.mark.parametrize(
  "config,match",
  [
    ({"units": U, "stateful": True}, "stateful"),
    ({"units": U, "time_major": True}, "time_major"),
    ({"units": 0}, "units"),
    ({"units": U, "activation": {"class_name": "Foo"}}, "activation"),
    ({"units": U, "recurrent_activation": "no_such"}, "no_such"),
    ({"units": U, "return_sequences": "yes"}, "return_sequences"),
    ({"units": U, "dropout": "0.5"}, "dropout"),
    ({"units": U, "use_cudnn": "maybe"}, "use_cudnn"),
    ({"units": U, "implementation": 3}, "implementation"),
    ({"units": U + 1}, "cell/kernel has shape"),
  ],
)
def test_bad_lstm_config(config, match):
  with pytest.raises(ConversionError, match=match):
    LAYERS["LSTM"](config, _weights(LAYERS["LSTM"], config, LSTM_SHAPES))


def test_bad_gru_bias():
  config = {"units": U, "reset_after": True}
  shapes = {"kernel": (D, 3 * U), "recurrent_kernel": (U, 3 * U), "bias": (3 * U,)}
  with pytest.raises(ConversionError, match="bias"):
    LAYERS["GRU"](config, _weights(LAYERS["GRU"], config, shapes))


def _lstm_entry(**config):
  return {"module": "keras.layers", "class_name": "LSTM", "config": {"units": U, **config}}


@pytest.mark.parametrize(
  "config,match",
  [
    ({"layer": _lstm_entry(), "merge_mode": "max"}, "merge_mode"),
    ({"layer": {"class_name": "Dense", "config": {"units": U}}}, "Dense"),
    ({"layer": "LSTM"}, "layer"),
    ({"layer": _lstm_entry(go_backwards=True)}, "go_backwards"),
    ({"layer": _lstm_entry(), "backward_layer": _lstm_entry()}, "go_backwards"),
    (
      {"layer": _lstm_entry(), "backward_layer": _lstm_entry(go_backwards=True, return_state=True)},
      "return_state",
    ),
    ({"layer": _lstm_entry(stateful=True)}, "stateful"),
  ],
)
def test_bad_bidirectional_config(config, match):
  with pytest.raises(ConversionError, match=match):
    cls = LAYERS["Bidirectional"]
    cls(config, _weights(cls, config, LSTM_SHAPES))
