"""EinsumDense, MultiHeadAttention, Attention and AdditiveAttention against Keras on the JAX backend.

Every forward comparison is bit-identical: the modules run the operations Keras's JAX backend runs
(``jnp.einsum``, ``jax.nn.dot_product_attention(implementation="xla")`` where Keras's MHA takes its
fused path on CPU, Keras's masked Softmax otherwise), in the same order. Training-mode dropout is
bit-identical too when the module is handed the key Keras's seed generator draws. One-step input
gradients agree within float32 tolerance (rtol 1e-5). Against Keras on TensorFlow (other kernels,
other summation orders) outputs agree within rtol 1e-5, atol 1e-5: measured at most 5.7e-6 off on
outputs up to 16 in magnitude (MHA over two attention axes), a few float32 ulps of the largest.

Keras broadcasts biases and masks by rank, so only Keras's own ``call`` runs under rank promotion
"allow" (``_build`` wraps it); the modules run under this suite's strict "raise".
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import keras
import numpy as np
import pytest
from flax import nnx
from keras.src import backend as keras_backend

from adamjax.convert._ir import ConversionError
from adamjax.convert.layers import LAYERS
from adamjax.convert.layers.einsum_dense import parse_equation
from tests.layer_harness import build_module, run_both

RNG = np.random.default_rng(0)


def _x(*shape, dtype="float32"):
  return RNG.standard_normal(shape).astype(dtype)


def _build(layer, *inputs):
  """Builds ``layer`` on symbolic inputs (no eager run), lets Keras's own ``call`` broadcast by
  rank (its biases and masks rely on it), and gives it random weights."""
  symbolic = jax.tree.map(lambda a: keras.KerasTensor(a.shape, str(a.dtype)), inputs)
  layer(*symbolic)
  call = layer.call

  @functools.wraps(call)
  def allow_rank_promotion(*args, **kwargs):
    with jax.numpy_rank_promotion("allow"):
      return call(*args, **kwargs)

  layer.call = allow_rank_promotion
  layer.set_weights([_x(*w.shape) for w in layer.get_weights()])
  return layer


def _compare(layer, *inputs, **kwargs):
  """run_both (our module under this suite's strict rank promotion): equal bits."""
  expected, got = run_both(_build(layer, *inputs), *inputs, **kwargs)
  jax.tree.map(np.testing.assert_array_equal, got, expected)
  return expected, got


class _FixedKey:
  """An rngs stand-in whose dropout stream yields Keras's key, for bit-identical dropout."""

  def __init__(self, key):
    self.key = key

  def dropout(self):
    return self.key


def _keras_stateless(layer, *inputs, **kwargs):
  @jax.jit
  def call(trainable, non_trainable, *args):
    return layer.stateless_call(trainable, non_trainable, *args, **kwargs)[0]

  return call(
    [v.value for v in layer.trainable_variables],
    [v.value for v in layer.non_trainable_variables],
    *inputs,
  )


def _seed_key(layer):
  """The key Keras's (only) seed generator hands to its next dropout call."""
  states = [v for v in layer.non_trainable_variables if "seed_generator" in v.path]
  assert len(states) == 1, [v.path for v in layer.non_trainable_variables]
  return jnp.asarray(states[0].value)


def _grads_match(layer, inputs, **kwargs):
  """d sum(out**2) / d inputs: ours against Keras's stateless_call, within float32 tolerance."""
  module = build_module(layer)
  graphdef, state = nnx.split(module)
  trainable = [v.value for v in layer.trainable_variables]
  non_trainable = [v.value for v in layer.non_trainable_variables]
  argnums = tuple(range(len(inputs)))

  def keras_loss(*args):
    return jnp.sum(layer.stateless_call(trainable, non_trainable, *args, **kwargs)[0] ** 2)

  def our_loss(*args):
    return jnp.sum(nnx.merge(graphdef, state)(*args, **kwargs) ** 2)

  expected = jax.jit(jax.grad(keras_loss, argnums))(*inputs)
  got = jax.jit(jax.grad(our_loss, argnums))(*inputs)
  jax.tree.map(lambda g, e: np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-6), got, expected)


# ---------------------------------------------------------------- EinsumDense


@pytest.mark.parametrize(
  ("equation", "output_shape", "bias_axes", "shape", "activation"),
  [
    ("ab,bc->ac", 5, "c", (3, 4), None),
    ("ab,bc->ac", 5, None, (3, 4), "relu"),
    ("abc,cd->abd", (None, 5), "d", (2, 3, 4), None),
    ("abc,cde->abde", (None, 2, 5), "de", (2, 3, 4), None),
    ("abc,cde->abde", (None, 2, 5), "d", (2, 3, 4), None),
    ("...b,bc->...c", 5, "c", (2, 3, 2, 4), None),
    ("...bc,cd->...bd", (3, 5), "bd", (2, 3, 4), None),
    ("ab...,bc->ac...", 5, "c", (2, 4, 3), None),
    ("abcd,cde->abe", (None, 5), "e", (2, 3, 4, 6), "linear"),
  ],
)
def test_einsum_dense(equation, output_shape, bias_axes, shape, activation):
  layer = keras.layers.EinsumDense(
    equation, output_shape=output_shape, bias_axes=bias_axes, activation=activation
  )
  _compare(layer, _x(*shape))


def test_einsum_dense_gradients_and_mixed_precision():
  layer = keras.layers.EinsumDense("abc,cde->abde", output_shape=(None, 2, 5), bias_axes="de")
  x = _x(2, 3, 4)
  _compare(layer, x)
  _grads_match(layer, (x,))
  half = keras.layers.EinsumDense(
    "abc,cd->abd", output_shape=(None, 5), bias_axes="d", dtype="mixed_bfloat16"
  )
  _compare(half, x.astype(jnp.bfloat16))
  assert build_module(half).kernel[...].dtype == jnp.float32


@pytest.mark.parametrize(
  "equation",
  [
    "ab,bc->ac; import os",
    "ab,bc->ac\n",
    "a" * 70 + ",ab->b",
    "ab,bc->ad",
    "ab,bcd->ac",
    "aab,bc->ac",
    "a...b,bc->ac",
    "a...,ab->b...",
    "ab->b",
    "AB,BC->AC ",
    "",
    123,
    None,
    ["ab,bc->ac"],
  ],
)
def test_einsum_dense_refuses_bad_equations(equation):
  with pytest.raises(ConversionError, match="equation"):
    parse_equation(equation)
  with pytest.raises(ConversionError, match="equation"):
    LAYERS["EinsumDense"](
      {"equation": equation, "output_shape": [5], "bias_axes": None},
      {"kernel": np.zeros((4, 5), "float32")},
    )


def test_einsum_dense_refuses_bad_bias_axes_and_kernel():
  kernel = {"kernel": np.zeros((4, 5), "float32"), "bias": np.zeros((5,), "float32")}
  for bias_axes in ("z", "", 3, ["c"]):
    with pytest.raises(ConversionError, match="bias_axes"):
      LAYERS["EinsumDense"]({"equation": "ab,bc->ac", "bias_axes": bias_axes}, kernel)
  with pytest.raises(ConversionError, match="kernel"):
    LAYERS["EinsumDense"]({"equation": "abc,cd->abd"}, {"kernel": np.zeros((2, 4, 5))})
  for key, value in (("lora_rank", 2), ("quantization_config", {"class_name": "Int8"})):
    with pytest.raises(ConversionError, match=key):
      LAYERS["EinsumDense"]({"equation": "ab,bc->ac", key: value}, {"kernel": np.zeros((4, 5))})
  assert LAYERS["EinsumDense"].variables({"equation": "ab,bc->ac", "bias_axes": "c"}) == (
    "kernel",
    "bias",
  )


# ---------------------------------------------------------------- MultiHeadAttention

Q, V, K = _x(2, 4, 6), _x(2, 5, 8), _x(2, 5, 7)
SELF = _x(2, 5, 6)
V_MASK = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], bool)
ATT_MASK = RNG.random((2, 4, 5)) > 0.3


@pytest.mark.parametrize(
  ("options", "inputs", "kwargs"),
  [
    ({}, (Q, V), {}),
    ({"value_dim": 3, "output_shape": (3, 2)}, (Q, V, K), {}),
    ({"use_bias": False, "output_shape": 7}, (Q, V), {}),
    ({}, (Q, V), {"attention_mask": ATT_MASK}),
    ({}, (Q, V, K), {"value_mask": V_MASK, "key_mask": V_MASK[::-1]}),
    ({}, (SELF, SELF), {"use_causal_mask": True}),
    ({"sliding_window": 2}, (SELF, SELF), {"use_causal_mask": True}),
    ({}, (Q, V), {"return_attention_scores": True, "attention_mask": ATT_MASK}),
    ({}, (SELF, SELF), {"return_attention_scores": True, "use_causal_mask": True}),
    (
      {},
      (SELF, SELF),
      {"return_attention_scores": True, "use_causal_mask": True, "value_mask": V_MASK},
    ),
    ({"dropout": 0.3}, (Q, V), {"value_mask": V_MASK}),
    ({"use_gate": True, "use_bias": False}, (Q, V), {"return_attention_scores": True}),
    ({"attention_axes": (-2,)}, (_x(2, 3, 4, 6), _x(2, 3, 5, 6)), {}),
    (
      {"attention_axes": (1, 2)},
      (_x(2, 3, 4, 6), _x(2, 2, 5, 6)),
      {"attention_mask": RNG.random((2, 3, 4, 2, 5)) > 0.3},
    ),
  ],
  ids=lambda v: str(v)[:40] if isinstance(v, dict) and v else "-",
)
def test_multi_head_attention(options, inputs, kwargs):
  layer = keras.layers.MultiHeadAttention(num_heads=2, key_dim=3, **options)
  _compare(layer, *inputs, **kwargs)


def test_supports_masking_as_keras():
  for name in ("EinsumDense", "MultiHeadAttention", "Attention", "AdditiveAttention"):
    keras_layer = getattr(keras.layers, name)(
      *{"EinsumDense": ("ab,bc->ac", 3), "MultiHeadAttention": (2, 3)}.get(name, ())
    )
    assert LAYERS[name].supports_masking == keras_layer.supports_masking, name


def test_multi_head_attention_variables_in_keras_order():
  cls = LAYERS["MultiHeadAttention"]
  assert cls.variables({}) == (
    "query_dense/kernel",
    "query_dense/bias",
    "key_dense/kernel",
    "key_dense/bias",
    "value_dense/kernel",
    "value_dense/bias",
    "output_dense/kernel",
    "output_dense/bias",
  )
  assert cls.variables({"use_bias": False, "use_gate": True}) == (
    "query_dense/kernel",
    "key_dense/kernel",
    "_gate_dense/kernel",
    "value_dense/kernel",
    "output_dense/kernel",
  )


def test_multi_head_attention_query_mask_from_the_graph():
  """Keras reads the query's mask from the tensor (the graph's propagated mask), not a kwarg."""
  layer = keras.layers.MultiHeadAttention(num_heads=2, key_dim=3, dropout=0.1)
  q_mask = np.array([[1, 1, 0, 0], [1, 1, 1, 1]], bool)
  _build(layer, Q, V)

  @jax.jit
  def keras_fn(q, v, qm, vm):
    keras_backend.set_keras_mask(q, qm)
    keras_backend.set_keras_mask(v, vm)
    return layer(q, v, return_attention_scores=True)

  expected = keras_fn(Q, V, q_mask, V_MASK)
  module = build_module(layer)
  got = jax.jit(
    lambda q, v, qm, vm: module(q, v, query_mask=qm, value_mask=vm, return_attention_scores=True)
  )(Q, V, q_mask, V_MASK)
  jax.tree.map(np.testing.assert_array_equal, got, expected)
  assert module.compute_mask([Q, V], [q_mask, V_MASK]) is q_mask


def test_multi_head_attention_dropout_in_training():
  layer = keras.layers.MultiHeadAttention(num_heads=2, key_dim=3, dropout=0.4, seed=7)
  _build(layer, Q, V)
  key = _seed_key(layer)
  expected = _keras_stateless(layer, Q, V, value_mask=V_MASK, training=True)
  module = build_module(layer)

  @jax.jit
  def ours(q, v):
    train = module(q, v, value_mask=V_MASK, training=True, rngs=_FixedKey(key))
    return train, module(q, v, value_mask=V_MASK)

  got, inference = ours(Q, V)
  np.testing.assert_array_equal(got, expected)
  assert not np.array_equal(got, inference)  # dropout did something
  with pytest.raises(ValueError, match="rngs"):
    module(Q, V, training=True)
  out = module(Q, V, training=True, rngs=nnx.Rngs(dropout=0))  # an nnx.Rngs works as is
  assert out.shape == (2, 4, 6)


@pytest.mark.parametrize(
  ("options", "kwargs"),
  [({}, {}), ({"dropout": 0.2, "use_gate": True}, {"attention_mask": ATT_MASK})],
)
def test_multi_head_attention_gradients(options, kwargs):
  layer = keras.layers.MultiHeadAttention(num_heads=2, key_dim=3, **options)
  _compare(layer, Q, V, K, **kwargs)
  _grads_match(layer, (Q, V, K), **kwargs)


@pytest.mark.parametrize(
  ("policy", "return_scores"), [("mixed_bfloat16", False), ("mixed_float16", True)]
)
def test_multi_head_attention_mixed_precision(policy, return_scores):
  """Both paths in half precision (the einsum path's masked Softmax uses -3e4 in float16)."""
  layer = keras.layers.MultiHeadAttention(num_heads=2, key_dim=3, dtype=policy)
  half = policy.removeprefix("mixed_")
  q, v = Q.astype(half), V.astype(half)
  expected, _ = _compare(
    layer, q, v, attention_mask=ATT_MASK, return_attention_scores=return_scores
  )
  assert jax.tree.leaves(expected)[0].dtype == half


@pytest.mark.parametrize(
  ("config", "match"),
  [
    ({"num_heads": 0, "key_dim": 3}, "num_heads"),
    ({"num_heads": 2, "key_dim": "3"}, "key_dim"),
    ({"num_heads": 2, "key_dim": 3, "dropout": 2.0}, "dropout"),
    ({"num_heads": 2, "key_dim": 3, "attention_axes": "1"}, "attention_axes"),
    ({"num_heads": 2, "key_dim": 3, "output_shape": [0]}, "output_shape"),
    ({"num_heads": 2, "key_dim": 3, "sliding_window": -1}, "sliding_window"),
    ({"num_heads": 2, "key_dim": 4}, "query_dense kernel"),
    ({"num_heads": 2, "key_dim": 3, "value_dim": 4}, "value_dense kernel"),
    ({"num_heads": 2, "key_dim": 3, "output_shape": [6, 1]}, "output_dense kernel"),
  ],
)
def test_multi_head_attention_refuses_bad_config(config, match):
  layer = _build(keras.layers.MultiHeadAttention(num_heads=2, key_dim=3), Q, V)
  cls = LAYERS["MultiHeadAttention"]
  weights = dict(zip(cls.variables({}), [np.asarray(w) for w in layer.weights], strict=True))
  with pytest.raises(ConversionError, match=match):
    cls(config, weights)


# ---------------------------------------------------------------- Attention, AdditiveAttention

AQ, AV, AK = _x(2, 3, 4), _x(2, 5, 4), _x(2, 5, 4)
Q_MASK = np.array([[1, 1, 0], [1, 1, 1]], bool)
ATTENTION_CASES = [
  ({}, [AQ, AV], {}),
  ({"use_scale": True}, [AQ, AV, AK], {"mask": [Q_MASK, V_MASK]}),
  ({"use_scale": True}, [AQ, AV], {"use_causal_mask": True, "return_attention_scores": True}),
  ({"score_mode": "concat"}, [AQ, AV, AK], {"mask": [None, V_MASK]}),
  ({"score_mode": "concat", "use_scale": True}, [AQ, AV], {"use_causal_mask": True}),
  (
    {"score_mode": "concat", "dropout": 0.5},
    [AQ, AV],
    {"use_causal_mask": True, "mask": [Q_MASK, V_MASK], "return_attention_scores": True},
  ),
]
ADDITIVE_CASES = [
  ({}, [AQ, AV, AK], {"mask": [Q_MASK, V_MASK], "return_attention_scores": True}),
  ({"use_scale": False}, [AQ, AV], {"use_causal_mask": True}),
  ({"dropout": 0.5}, [AQ, AV], {"use_causal_mask": True, "mask": [None, V_MASK]}),
]


@pytest.mark.parametrize(("options", "inputs", "kwargs"), ATTENTION_CASES, ids=str)
def test_attention(options, inputs, kwargs):
  _compare(keras.layers.Attention(**options), inputs, **kwargs)


@pytest.mark.parametrize(("options", "inputs", "kwargs"), ADDITIVE_CASES, ids=str)
def test_additive_attention(options, inputs, kwargs):
  _compare(keras.layers.AdditiveAttention(**options), inputs, **kwargs)


@pytest.mark.parametrize(
  "layer",
  [
    lambda: keras.layers.Attention(use_scale=True, dropout=0.5, seed=3),
    lambda: keras.layers.Attention(score_mode="concat", dropout=0.5, seed=3),
    lambda: keras.layers.AdditiveAttention(dropout=0.5, seed=3),
  ],
)
def test_dense_attention_dropout_and_gradients(layer):
  layer = layer()
  mask = [Q_MASK, V_MASK]
  _build(layer, [AQ, AV])
  key = _seed_key(layer)
  expected = _keras_stateless(layer, [AQ, AV], mask=mask, training=True)
  module = build_module(layer)
  got = jax.jit(lambda q, v: module([q, v], mask=mask, training=True, rngs=_FixedKey(key)))(AQ, AV)
  np.testing.assert_array_equal(got, expected)
  with pytest.raises(ValueError, match="rngs"):
    module([AQ, AV], training=True)
  assert module.compute_mask([AQ, AV], mask) is Q_MASK
  assert module.compute_mask([AQ, AV], None) is None
  _grads_match(layer, ([AQ, AV, AK],), mask=mask)


def test_dense_attention_mixed_precision_and_bad_config():
  """Attention's padding offset is 65504 in float16 and 1e9 otherwise."""
  for cls, half in (
    (keras.layers.Attention, "float16"),
    (keras.layers.AdditiveAttention, "bfloat16"),
  ):
    layer = cls(use_scale=True, dtype=f"mixed_{half}")
    expected, _ = _compare(layer, [AQ.astype(half), AV.astype(half)], mask=[Q_MASK, V_MASK])
    assert expected.dtype == half
  with pytest.raises(ConversionError, match="score_mode"):
    LAYERS["Attention"]({"score_mode": "general"}, {})
  with pytest.raises(ConversionError, match="use_scale"):
    LAYERS["AdditiveAttention"]({"use_scale": "yes"}, {"scale": np.ones(4, "float32")})
  module = LAYERS["Attention"]({}, {})
  with pytest.raises(ValueError, match="list"):
    module(AQ)


def test_multi_head_attention_refuses_bad_bias():
  layer = _build(keras.layers.MultiHeadAttention(num_heads=2, key_dim=3), Q, V)
  cls = LAYERS["MultiHeadAttention"]
  weights = dict(zip(cls.variables({}), [np.asarray(w) for w in layer.weights], strict=True))
  config = {"num_heads": 2, "key_dim": 3}
  for name, match in (("key_dense/bias", "key_dense bias"), ("output_dense/bias", "output_dense")):
    bad = dict(weights, **{name: np.zeros(7, "float32")})
    with pytest.raises(ConversionError, match=match):
      cls(config, bad)


# ---------------------------------------------------------------- Keras on TensorFlow

TF_CASES = [
  (
    lambda: keras.layers.EinsumDense("abc,cde->abde", output_shape=(None, 2, 5), bias_axes="de"),
    (_x(2, 3, 4),),
    {},
  ),
  (lambda: keras.layers.EinsumDense("ab...,bc->ac...", 5, bias_axes="c"), (_x(2, 4, 3),), {}),
  (lambda: keras.layers.MultiHeadAttention(2, 3), (Q, V, K), {"attention_mask": ATT_MASK}),
  (
    lambda: keras.layers.MultiHeadAttention(2, 3, use_gate=True, output_shape=(3, 2)),
    (SELF, SELF),
    {"use_causal_mask": True, "value_mask": V_MASK, "return_attention_scores": True},
  ),
  (
    lambda: keras.layers.MultiHeadAttention(2, 3, attention_axes=(1, 2)),
    (_x(2, 3, 4, 6), _x(2, 2, 5, 6)),
    {"attention_mask": RNG.random((2, 3, 4, 2, 5)) > 0.3},
  ),
  (
    lambda: keras.layers.Attention(use_scale=True, score_mode="concat"),
    ([AQ, AV, AK],),
    {"mask": [Q_MASK, V_MASK], "return_attention_scores": True},
  ),
  (lambda: keras.layers.Attention(use_scale=True), ([AQ, AV],), {"use_causal_mask": True}),
  (lambda: keras.layers.AdditiveAttention(), ([AQ, AV],), {"mask": [Q_MASK, V_MASK]}),
]


def _pack(value, arrays, key):
  """JSON for the TensorFlow child: arrays go into ``arrays`` and are named."""
  if isinstance(value, np.ndarray):
    arrays[key] = value
    return {"__array__": key}
  if isinstance(value, (list, tuple)):
    return [_pack(v, arrays, f"{key}_{i}") for i, v in enumerate(value)]
  return value


def _unpack(value, arrays):
  if isinstance(value, dict):
    return arrays[value["__array__"]]
  if isinstance(value, list):
    return [_unpack(v, arrays) for v in value]
  return value


def keras_tf_outputs(arrays, spec):
  """The TensorFlow child's side: each case's layer from its config and weights, called once."""
  outputs = {}
  for i, case in enumerate(spec["cases"]):
    layer = getattr(keras.layers, case["class_name"]).from_config(case["config"])
    args = _unpack(case["args"], arrays)
    kwargs = {k: _unpack(v, arrays) for k, v in case["kwargs"].items()}
    layer(*args, **kwargs)
    layer.set_weights(_unpack(case["weights"], arrays))
    result = layer(*args, **kwargs)
    for j, out in enumerate(result if isinstance(result, tuple) else (result,)):
      outputs[f"case{i}_{j}"] = np.asarray(out)
  return outputs


def test_against_keras_tensorflow():
  """Keras on TensorFlow (its own kernels, in a subprocess): within float32 rounding (above)."""
  from adamjax.testing._keras_subprocess import call_in_keras_backend

  arrays, cases, ours = {}, [], []
  for i, (make, args, kwargs) in enumerate(TF_CASES):
    layer = _build(make(), *args)
    module = build_module(layer)
    result = jax.jit(lambda *a, module=module, kwargs=kwargs: module(*a, **kwargs))(*args)
    ours.append(result if isinstance(result, tuple) else (result,))
    cases.append(
      {
        "class_name": type(layer).__name__,
        "config": layer.get_config(),
        "weights": _pack([np.asarray(w) for w in layer.weights], arrays, f"c{i}_w"),
        "args": _pack(list(args), arrays, f"c{i}_a"),
        "kwargs": {k: _pack(v, arrays, f"c{i}_{k}") for k, v in kwargs.items()},
      }
    )
  root = str(__import__("pathlib").Path(__file__).resolve().parents[1])
  tf = call_in_keras_backend(
    "tensorflow", __file__, "keras_tf_outputs", arrays, {"cases": cases}, pythonpath=[root]
  )
  assert len(tf) == sum(len(o) for o in ours)
  for i, outs in enumerate(ours):
    for j, out in enumerate(outs):
      np.testing.assert_allclose(out, tf[f"case{i}_{j}"], rtol=1e-5, atol=1e-5, err_msg=f"{i}")
