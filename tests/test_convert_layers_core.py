"""Core, activation, merging and preprocessing layers of the converter's registry against Keras.

Each Keras layer is built live (JAX backend), rebuilt through the registry from its config and
weights (``tests/layer_harness.py``), and both run under ``jax.jit``: every output is asserted
bit-identical to Keras-JAX, because each module calls the same ``jnp``/``jax.nn`` operations in
the same order as the Keras JAX backend. One-step gradients (``d sum(out**2) / d inputs``, Keras
via ``stateless_call``) are compared within float32 tolerance (rtol 1e-6, atol 1e-6). One test
runs every layer against Keras on TensorFlow (a subprocess) within a stated float32 bound.
"""

from pathlib import Path

import jax
import jax.numpy as jnp
import keras
import numpy as np
import pytest
from flax import nnx
from keras.src import backend as keras_backend
from layer_harness import build_module, run_both

from adamjax.convert._ir import ConversionError
from adamjax.convert._keras_config import ACTIVATIONS as CONFIG_ACTIVATIONS
from adamjax.convert.layers import LAYERS
from adamjax.convert.layers.activations import ACTIVATIONS, get_activation

RNG = np.random.default_rng(13)


@pytest.fixture(autouse=True)
def _keras_broadcasts_implicitly():
  # Keras adds biases and scales by implicit rank promotion, which this suite's conftest makes
  # an error; the modules themselves run under "raise" (test_modules_under_strict_rank_promotion).
  with jax.numpy_rank_promotion("allow"):
    yield


def normal(*shape, scale=3.0, dtype="float32"):
  return jnp.asarray(RNG.normal(size=shape) * scale, dtype=dtype)


def with_specials(x):
  """``x`` with exact zeros, ties and large magnitudes planted (the branches of relu & co)."""
  flat = np.array(x, dtype=np.float32).reshape(-1)
  specials = [0.0, -0.0, 6.0, -6.0, 3.0, -3.0, 0.5, 1e4, -1e4, 88.0, -88.0, 1e-8]
  flat[: len(specials)] = specials
  return jnp.asarray(flat.reshape(x.shape), dtype=x.dtype)


def assert_same(expected, got):
  jax.tree.map(np.testing.assert_array_equal, expected, got)
  jax.tree.map(lambda e, g: np.testing.assert_equal(e.dtype, g.dtype), expected, got)


def assert_grads_match(keras_layer, inputs, **kwargs):
  """Gradients of ``sum(out**2)`` w.r.t. the inputs, Keras (stateless_call) vs the module."""
  module = build_module(keras_layer)
  trainable = [v.value for v in keras_layer.trainable_variables]
  non_trainable = [v.value for v in keras_layer.non_trainable_variables]

  def keras_loss(x):
    out, _ = keras_layer.stateless_call(trainable, non_trainable, x, **kwargs)
    return jnp.sum(jnp.square(out.astype(jnp.float32)))

  graphdef, state = nnx.split(module)

  def our_loss(x):
    out = nnx.merge(graphdef, state)(x, **kwargs)
    return jnp.sum(jnp.square(out.astype(jnp.float32)))

  expected = jax.jit(jax.grad(keras_loss))(inputs)
  got = jax.jit(jax.grad(our_loss))(inputs)
  jax.tree.map(
    lambda e, g: np.testing.assert_allclose(
      np.asarray(g, np.float32), np.asarray(e, np.float32), rtol=1e-6, atol=1e-6
    ),
    expected,
    got,
  )


def from_config(class_name, config, weights=None):
  return LAYERS[class_name](config, weights or {})


# ----------------------------------------------------------------------------- activations


def test_every_config_activation_is_implemented():
  assert set(ACTIVATIONS) == set(CONFIG_ACTIVATIONS)


@pytest.mark.parametrize("name", sorted(CONFIG_ACTIVATIONS))
def test_activation_layer(name):
  layer = keras.layers.Activation(name)
  x = with_specials(normal(4, 9))
  expected, got = run_both(layer, x)
  assert_same(expected, got)
  assert_grads_match(layer, normal(4, 9))


@pytest.mark.parametrize("name", ["gelu", "softmax", "hard_silu", "mish", "selu"])
def test_activation_bfloat16(name):
  layer = keras.layers.Activation(name, dtype="bfloat16")
  expected, got = run_both(layer, normal(3, 8, dtype="bfloat16"))
  assert_same(expected, got)


@pytest.mark.parametrize("activation", ["gelu", "tanh", "softmax", None])
def test_dense_activation(activation):
  layer = keras.layers.Dense(5, activation=activation)
  x = normal(3, 4)
  layer(x)
  layer.set_weights([np.asarray(w) + RNG.normal(size=w.shape) for w in layer.get_weights()])
  expected, got = run_both(layer, x)
  assert_same(expected, got)
  assert_grads_match(layer, x)


@pytest.mark.parametrize(
  "make",
  [
    lambda: keras.layers.LeakyReLU(0.1),
    lambda: keras.layers.ReLU(6.0),
    lambda: keras.layers.ReLU(2.0, negative_slope=0.2, threshold=0.1),
    lambda: keras.layers.ELU(0.5),
    lambda: keras.layers.Softmax(),
    lambda: keras.layers.Activation("gelu"),
  ],
)
def test_dense_with_an_activation_layer(make):
  # Dense(activation=LeakyReLU(0.1)): the config holds the layer's config as the activation.
  layer = keras.layers.Dense(4, activation=make())
  assert isinstance(layer.get_config()["activation"], dict)
  x = normal(3, 5)
  expected, got = run_both(layer, x)
  assert_same(expected, got)


def test_unknown_activation_is_refused():
  with pytest.raises(ConversionError, match="not a built-in Keras activation"):
    get_activation("sparsemax_custom")
  with pytest.raises(ConversionError, match="not a built-in Keras activation"):
    get_activation({"class_name": "function", "config": "relu"})
  with pytest.raises(ConversionError, match="PReLU"):  # has weights: not an activation function
    get_activation({"module": "keras.layers", "class_name": "PReLU", "config": {}})
  assert get_activation(None)(jnp.ones(2)) is not None


# Each branch of ReLU.static_call: relu, relu6 (max_value == 6), clip, leaky_relu, thresholds.
@pytest.mark.parametrize(
  "max_value, negative_slope, threshold",
  [
    (None, 0.0, 0.0),
    (6, 0.0, 0.0),
    (2.5, 0.0, 0.0),
    (None, 0.1, 0.0),
    (6.0, 0.1, 0.0),
    (None, 0.0, 0.5),
    (6, 0.0, 0.5),
    (2.5, 0.1, 0.5),
  ],
)
def test_relu(max_value, negative_slope, threshold):
  layer = keras.layers.ReLU(max_value=max_value, negative_slope=negative_slope, threshold=threshold)
  x = with_specials(normal(4, 8))
  expected, got = run_both(layer, x)
  assert_same(expected, got)
  assert_grads_match(layer, normal(4, 8))


@pytest.mark.parametrize("option", ["max_value", "negative_slope", "threshold"])
def test_relu_bad_options(option):
  with pytest.raises(ConversionError, match=option):
    from_config("ReLU", {option: -1.0})
  with pytest.raises(ConversionError, match=option):
    from_config("ReLU", {option: "1"})


@pytest.mark.parametrize("negative_slope", [0.3, 0.01, 0.0])
def test_leaky_relu(negative_slope):
  layer = keras.layers.LeakyReLU(negative_slope=negative_slope)
  expected, got = run_both(layer, with_specials(normal(3, 7)))
  assert_same(expected, got)
  assert_grads_match(layer, normal(3, 7))


def test_leaky_relu_tf_keras_alpha():
  # tf-keras configs name the slope `alpha`; Keras 3 reads it as negative_slope.
  module = from_config("LeakyReLU", {"alpha": 0.2})
  x = normal(3, 5)
  with pytest.warns(UserWarning, match="alpha"):
    layer = keras.layers.LeakyReLU(alpha=0.2)
  np.testing.assert_array_equal(np.asarray(jax.jit(module)(x)), np.asarray(jax.jit(layer)(x)))


@pytest.mark.parametrize("alpha", [1.0, 0.5, 2.0])
def test_elu(alpha):
  layer = keras.layers.ELU(alpha=alpha)
  expected, got = run_both(layer, with_specials(normal(3, 7)))
  assert_same(expected, got)
  assert_grads_match(layer, normal(3, 7))


@pytest.mark.parametrize("shared_axes", [None, [1], [1, 2], 2])
@pytest.mark.parametrize("dtype", ["float32", "mixed_bfloat16"])
def test_prelu(shared_axes, dtype):
  layer = keras.layers.PReLU(shared_axes=shared_axes, dtype=dtype)
  compute = "bfloat16" if dtype == "mixed_bfloat16" else "float32"
  x = normal(2, 3, 4, 5, dtype=compute)
  layer(x)
  (alpha,) = layer.get_weights()
  layer.set_weights([RNG.normal(size=alpha.shape).astype("float32")])
  expected, got = run_both(layer, x)
  assert_same(expected, got)
  if dtype == "float32":
    assert_grads_match(layer, x)


@pytest.mark.parametrize(
  "axis, shape", [(-1, (3, 6)), (1, (2, 5, 4)), ([1, 2], (2, 3, 4)), ([2], (2, 3, 4))]
)
def test_softmax(axis, shape):
  layer = keras.layers.Softmax(axis=axis)
  x = normal(*shape)
  expected, got = run_both(layer, x)
  assert_same(expected, got)
  assert_grads_match(layer, x)


@pytest.mark.parametrize(
  "kind, dtype",
  [("bool", "float32"), ("float", "float32"), ("broadcast", "float32"), ("all_masked", "float16")],
)
def test_softmax_mask(kind, dtype):
  layer = keras.layers.Softmax(dtype=dtype)
  x = normal(2, 3, 5, dtype=dtype)
  mask = RNG.random((2, 3, 5)) > 0.4
  if kind == "float":
    mask = jnp.asarray(RNG.random((2, 3, 5)), dtype="float32")
  elif kind == "broadcast":
    mask = RNG.random((3, 5)) > 0.4
  elif kind == "all_masked":
    mask[0, 1, :] = False
  expected, got = run_both(layer, x, mask=jnp.asarray(mask))
  assert_same(expected, got)


def test_softmax_mask_that_does_not_broadcast():
  module = from_config("Softmax", {"axis": -1})
  with pytest.raises(ValueError, match="broadcast"):
    module(normal(2, 3), mask=jnp.ones((2, 4), bool))


# ----------------------------------------------------------------------------------- core


@pytest.mark.parametrize(
  "mask_zero, ids_dtype, dtype",
  [
    (False, "int32", "float32"),
    (True, "int32", "float32"),
    (True, "float32", "float32"),
    (True, "int32", "mixed_bfloat16"),
    (False, "float32", "mixed_float16"),
  ],
)
def test_embedding(mask_zero, ids_dtype, dtype):
  layer = keras.layers.Embedding(11, 4, mask_zero=mask_zero, dtype=dtype)
  ids = jnp.asarray(RNG.integers(0, 11, size=(3, 6)), dtype=ids_dtype)
  if ids_dtype == "float32":
    ids = ids + 0.7  # Keras casts (truncates) to int32
  expected, got = run_both(layer, ids)
  assert_same(expected, got)
  module = build_module(layer)
  assert module.supports_masking == layer.supports_masking == mask_zero
  assert module.embedding[...].shape == (11, 4)  # Flax's name for the table
  keras_mask = layer.compute_mask(ids)
  our_mask = module.compute_mask(ids, None)
  if mask_zero:
    np.testing.assert_array_equal(np.asarray(our_mask), np.asarray(keras_mask))
  else:
    assert our_mask is None and keras_mask is None


def test_embedding_gradient_wrt_table():
  layer = keras.layers.Embedding(7, 3)
  ids = jnp.asarray(RNG.integers(0, 7, size=(4, 5)), dtype="int32")
  layer(ids)
  module = build_module(layer)

  def keras_loss(table):
    out, _ = layer.stateless_call([table], [], ids)
    return jnp.sum(out**2)

  graphdef, state = nnx.split(module)

  def our_loss(table):
    only_table = jax.tree.map(lambda _: table, state)  # the state's one leaf is the table
    return jnp.sum(nnx.merge(graphdef, only_table)(ids) ** 2)

  table = layer.embeddings.value
  np.testing.assert_allclose(
    np.asarray(jax.grad(our_loss)(table)), np.asarray(jax.grad(keras_loss)(table)), rtol=1e-6
  )


def test_embedding_bad_config():
  table = {"embeddings": np.zeros((5, 2), np.float32)}
  with pytest.raises(ConversionError, match="input_dim"):
    from_config("Embedding", {"input_dim": 0, "output_dim": 2}, table)
  with pytest.raises(ConversionError, match="do not match"):
    from_config("Embedding", {"input_dim": 4, "output_dim": 2}, table)


@pytest.mark.parametrize("mask_value", [0.0, 1.5])
def test_masking(mask_value):
  layer = keras.layers.Masking(mask_value=mask_value)
  x = np.array(normal(3, 5, 4))
  x[0, 1] = mask_value
  x[2, [0, 4]] = mask_value
  x[1, 2, :2] = mask_value  # only part of a step: not masked
  x = jnp.asarray(x)
  expected, got = run_both(layer, x)
  assert_same(expected, got)
  module = build_module(layer)

  @jax.jit
  def keras_mask(x):
    return keras_backend.get_keras_mask(layer(x))

  np.testing.assert_array_equal(np.asarray(module.compute_mask(x, None)), keras_mask(x))
  assert_grads_match(layer, x)


def test_masking_bad_value():
  with pytest.raises(ConversionError, match="mask_value"):
    from_config("Masking", {"mask_value": "0"})


def test_identity():
  expected, got = run_both(keras.layers.Identity(), normal(2, 3))
  assert_same(expected, got)


# -------------------------------------------------------------------------------- merging


def run_merge(layer, inputs, masks=None):
  """Keras (masks attached to the input tensors, as a functional graph does) vs the module:
  ``((keras output, keras output mask), (ours, our compute_mask))``, both jitted."""
  layer([jnp.zeros_like(x) for x in inputs])
  module = build_module(layer)
  masks = masks or [None] * len(inputs)

  @jax.jit
  def keras_fn(inputs, masks):
    inputs = [x + jnp.zeros((), x.dtype) for x in inputs]  # fresh tensors to attach masks to
    for x, m in zip(inputs, masks, strict=True):
      if m is not None:
        keras_backend.set_keras_mask(x, m)
    out = layer(inputs)
    return out, keras_backend.get_keras_mask(out)

  graphdef, state = nnx.split(module)

  @jax.jit
  def ours(state, inputs, masks):
    module = nnx.merge(graphdef, state)
    mask = None if all(m is None for m in masks) else masks
    return module(inputs, mask=mask), module.compute_mask(inputs, mask)

  expected = keras_fn(inputs, masks)
  got = ours(state, inputs, masks)
  return jax.tree.map(np.asarray, expected), jax.tree.map(np.asarray, got)


def assert_merge_same(expected, got):
  assert_same(expected[0], got[0])
  if expected[1] is None:
    assert got[1] is None
  else:
    np.testing.assert_array_equal(got[1], expected[1])


ELEMENTWISE = ["Add", "Subtract", "Multiply", "Average", "Maximum", "Minimum"]


@pytest.mark.parametrize(
  "class_name, n", [(c, n) for c in ELEMENTWISE for n in (2, 3) if (c, n) != ("Subtract", 3)]
)
def test_elementwise_merge(class_name, n):
  layer = getattr(keras.layers, class_name)()
  inputs = [normal(2, 5, 3) for _ in range(n)]
  expected, got = run_merge(layer, inputs)
  assert_merge_same(expected, got)
  if n == 2:  # one gradient check per class (compile time)
    assert_grads_match(layer, inputs)


@pytest.mark.parametrize("class_name", ELEMENTWISE)
@pytest.mark.parametrize("which", ["all", "first", "second"])
def test_elementwise_merge_masks(class_name, which):
  layer = getattr(keras.layers, class_name)()
  inputs = [normal(2, 5, 3), normal(2, 5, 3)]
  m0, m1 = (jnp.asarray(RNG.random((2, 5)) > 0.4) for _ in range(2))
  masks = {"all": [m0, m1], "first": [m0, None], "second": [None, m1]}[which]
  expected, got = run_merge(layer, inputs, masks)
  assert_merge_same(expected, got)


@pytest.mark.parametrize("class_name", ["Add", "Multiply", "Maximum"])
@pytest.mark.parametrize("masked", [False, True])
def test_merge_inputs_of_different_ranks(class_name, masked):
  # Keras expands the lower-rank input at axis 1; the expanded tensor loses its mask.
  layer = getattr(keras.layers, class_name)()
  inputs = [normal(2, 4, 3), normal(2, 3)]
  masks = [jnp.asarray(RNG.random((2, 4)) > 0.3), jnp.asarray(RNG.random((2,)) > 0.3)]
  if not masked:
    expected, got = run_merge(layer, inputs[::-1])
    assert_merge_same(expected, got)
    return
  for order in (slice(None), slice(None, None, -1)):
    # The 3-D input's mask still picks values in Maximum and Multiply; the 2-D one's is gone.
    expected, got = run_merge(layer, inputs[order], [masks[0], None][order])
    assert_merge_same(expected, got)
    expected, got = run_merge(layer, inputs[order], [None, masks[1]][order])
    assert_merge_same(expected, got)


@pytest.mark.parametrize("axis", [-1, 1, 2])
@pytest.mark.parametrize("which", ["none", "all", "first"])
def test_concatenate(axis, which):
  layer = keras.layers.Concatenate(axis=axis)
  inputs = [normal(2, 4, 3), normal(2, 4, 3)]
  m0, m1 = (jnp.asarray(RNG.random((2, 4)) > 0.4) for _ in range(2))
  masks = {"none": None, "all": [m0, m1], "first": [m0, None]}[which]
  expected, got = run_merge(layer, inputs, masks)
  assert_merge_same(expected, got)
  if masks is None:  # gradients do not depend on the masks here
    assert_grads_match(layer, inputs)


@pytest.mark.parametrize(
  "axes, shapes",
  [
    (1, [(3, 4), (3, 4)]),
    (-1, [(3, 4), (3, 4)]),
    ((2, 1), [(2, 5, 4), (2, 4, 3)]),
    ((1, 2), [(2, 4, 5), (2, 3, 4)]),
    ((2, 2), [(2, 3, 4), (2, 5, 4)]),
    ((-1, 1), [(2, 3, 4), (2, 4)]),
    ((3, 1), [(2, 3, 2, 4), (2, 4, 5, 2)]),
  ],
)
@pytest.mark.parametrize("normalize", [False, True])
def test_dot(axes, shapes, normalize):
  layer = keras.layers.Dot(axes=axes, normalize=normalize)
  inputs = [normal(*s) for s in shapes]
  expected, got = run_merge(layer, inputs)
  assert_merge_same(expected, got)
  if normalize:  # the normalized path contains the plain batch_dot
    assert_grads_match(layer, inputs)


def test_dot_normalize_zero_vector():
  layer = keras.layers.Dot(axes=1, normalize=True)
  inputs = [jnp.zeros((2, 3)), normal(2, 3)]
  expected, got = run_merge(layer, inputs)
  assert_merge_same(expected, got)


@pytest.mark.parametrize("axes", ["1", [1], [1, 2, 3], [1.0, 2]])
def test_dot_bad_axes(axes):
  with pytest.raises(ConversionError, match="axes"):
    from_config("Dot", {"axes": axes})


def test_merge_needs_a_list():
  with pytest.raises(ValueError, match="list"):
    from_config("Add", {})(normal(2, 3))
  with pytest.raises(ValueError, match="exactly 2"):
    from_config("Subtract", {})([normal(2, 3)] * 3)


# -------------------------------------------------------------------------- preprocessing


RESCALINGS = [
  (1 / 255, 0.0),
  (1 / 127.5, -1),
  ([0.5, 2.0, 1 / 3], [0.1, -0.2, 0.3]),
  (np.array([0.5, 2.0, 1 / 3], "float64"), np.float32(0.25)),
  (np.array([0.5, 2.0, 0.1], "float32"), 0.0),
]


@pytest.mark.parametrize(
  "scale, offset, dtype",
  [(s, o, "float32") for s, o in RESCALINGS]
  + [(s, o, d) for s, o in RESCALINGS[2:4] for d in ("bfloat16", "mixed_float16")]
  + [(1 / 255, 0.0, "mixed_bfloat16")],
)
def test_rescaling(scale, offset, dtype):
  layer = keras.layers.Rescaling(scale=scale, offset=offset, dtype=dtype)
  x = jnp.asarray(RNG.integers(0, 256, size=(2, 4, 3)), dtype="float32")
  expected, got = run_both(layer, x)
  assert_same(expected, got)
  if dtype == "float32":
    assert_grads_match(layer, x)


def test_rescaling_uint8_input():
  layer = keras.layers.Rescaling(1 / 255)
  expected, got = run_both(layer, jnp.asarray(RNG.integers(0, 256, size=(2, 5)), dtype="uint8"))
  assert_same(expected, got)


@pytest.mark.parametrize(
  "scale", [None, "2", {"class_name": "Lambda", "config": {}}, [[1, 2], [3]]]
)
def test_rescaling_bad_scale(scale):
  with pytest.raises(ConversionError, match="scale"):
    from_config("Rescaling", {"scale": scale})


@pytest.mark.parametrize(
  "axis, shape",
  [(-1, (8, 3)), (None, (8, 3)), ((1, 2), (6, 2, 3)), (1, (6, 4, 3)), ([-1], (6, 2, 3))],
)
@pytest.mark.parametrize("invert", [False, True])
def test_normalization_adapted(axis, shape, invert):
  layer = keras.layers.Normalization(axis=axis, invert=invert)
  data = np.asarray(normal(*shape)) * 2 + 1
  layer.adapt(data)
  assert {w.path.rsplit("/", 1)[-1] for w in layer.weights} == {"mean", "variance", "count"}
  expected, got = run_both(layer, jnp.asarray(data))
  assert_same(expected, got)
  assert_grads_match(layer, jnp.asarray(data))


@pytest.mark.parametrize("dtype", ["mixed_bfloat16", "float16"])
def test_normalization_adapted_reduced_precision(dtype):
  layer = keras.layers.Normalization(axis=-1, dtype=dtype)
  data = np.asarray(normal(8, 5)) + 3
  layer.adapt(data)
  expected, got = run_both(layer, jnp.asarray(data))
  assert_same(expected, got)


def test_normalization_adapted_with_zero_variance():
  layer = keras.layers.Normalization()
  data = np.array(normal(5, 3))
  data[:, 1] = 2.0  # variance 0: Keras divides by epsilon
  layer.adapt(data)
  expected, got = run_both(layer, jnp.asarray(data))
  assert_same(expected, got)


@pytest.mark.parametrize(
  "axis, mean, variance, shape",
  [
    (-1, [1.0, 2.0, 3.0], [4.0, 0.25, 2.0], (4, 3)),
    (-1, 0.5, 2.0, (4, 3)),
    ((1, 2), [1.0, 2.0, 3.0], [4.0, 0.25, 2.0], (4, 2, 3)),
    ((1, 2), [[1.0, 2.0, 3.0], [0.0, -1.0, 5.0]], [[4.0, 0.25, 2.0], [1, 2, 3]], (4, 2, 3)),
    (None, 3.0, 9.0, (4, 3)),
  ],
)
@pytest.mark.parametrize(
  "invert, dtype", [(False, "float32"), (True, "float32"), (False, "float16")]
)
def test_normalization_given_statistics(axis, mean, variance, shape, invert, dtype):
  layer = keras.layers.Normalization(
    axis=axis, mean=mean, variance=variance, invert=invert, dtype=dtype
  )
  x = normal(*shape, dtype=dtype)
  expected, got = run_both(layer, x)
  assert_same(expected, got)


def test_normalization_bad_configs():
  with pytest.raises(ConversionError, match="both"):
    from_config("Normalization", {"mean": [1.0], "variance": None})
  with pytest.raises(ConversionError, match="different shapes"):
    from_config("Normalization", {"mean": [1.0, 2.0], "variance": [1.0]})
  with pytest.raises(ConversionError, match="more axes"):
    from_config("Normalization", {"axis": -1, "mean": [[1.0]], "variance": [[1.0]]})
  with pytest.raises(ConversionError, match="axis"):
    from_config("Normalization", {"axis": "x", "mean": 1.0, "variance": 1.0})
  weights = {"mean": np.zeros(3), "variance": np.ones(2), "count": np.zeros((), np.int32)}
  with pytest.raises(ConversionError, match="do not match"):
    from_config("Normalization", {"axis": -1}, weights)


def test_modules_under_strict_rank_promotion():
  dense = from_config(
    "Dense", {"units": 2}, {"kernel": np.ones((3, 2), "float32"), "bias": np.ones(2, "float32")}
  )
  prelu = from_config("PReLU", {}, {"alpha": np.ones((4, 3), "float32")})
  rescaling = from_config("Rescaling", {"scale": [1.0, 2.0, 3.0], "offset": 0.5})
  weights = {"mean": np.zeros(3), "variance": np.ones(3), "count": np.zeros((), np.int32)}
  normalization = from_config("Normalization", {"axis": -1}, weights)
  x = normal(2, 4, 3)
  with jax.numpy_rank_promotion("raise"):
    assert dense(x).shape == (2, 4, 2)
    assert prelu(x).shape == rescaling(x).shape == normalization(x).shape == x.shape
    softmax = from_config("Softmax", {})
    assert softmax(x, mask=jnp.ones((4, 3), bool)).shape == x.shape
    assert from_config("Add", {})([x, normal(2, 3)]).shape == x.shape


@pytest.mark.parametrize(
  "make, x",
  [
    (
      lambda: keras.layers.Embedding(9, 3, embeddings_regularizer=keras.regularizers.L2(0.01)),
      jnp.asarray([[1, 2, 0]], "int32"),
    ),
    (lambda: keras.layers.PReLU(alpha_regularizer=keras.regularizers.L1(0.1)), jnp.ones((2, 4))),
  ],
)
def test_weight_regularizers(make, x):
  # The registry's variable names are the prefixes of the *_regularizer options.
  layer = make()
  layer(x)
  layer.set_weights([RNG.normal(size=w.shape).astype("float32") for w in layer.get_weights()])
  module = build_module(layer)
  (expected,) = [np.asarray(loss) for loss in layer.losses]
  (got,) = [np.asarray(loss) for loss in module.losses()]
  np.testing.assert_allclose(got, expected, rtol=1e-6)


# ---------------------------------------------------------------------- Keras on TensorFlow


def keras_tf_outputs(arrays, spec):
  """Subprocess side (KERAS_BACKEND=tensorflow): each serialized layer on its inputs/weights."""
  outputs = {}
  for i, case in enumerate(spec["cases"]):
    layer = keras.layers.deserialize(case["layer"])
    xs = [arrays[f"{i}_x{j}"] for j in range(case["num_inputs"])]
    inputs = xs if case["is_list"] else xs[0]
    layer(inputs)
    layer.set_weights([arrays[f"{i}_w{j}"] for j in range(case["num_weights"])])
    if hasattr(layer, "finalize_state"):
      layer.finalize_state()  # Normalization: mean/variance from the loaded variables
    outputs[str(i)] = keras.ops.convert_to_numpy(layer(inputs))
  return outputs


def tf_cases():
  ids = jnp.asarray(RNG.integers(0, 9, size=(3, 5)), "int32")
  adapted = keras.layers.Normalization(axis=-1)
  adapted.adapt(np.asarray(normal(10, 4)) + 2)
  x34 = normal(3, 4)
  cases = [(keras.layers.Activation(name), x34) for name in sorted(CONFIG_ACTIVATIONS)]
  cases += [
    (keras.layers.ReLU(max_value=2.5, negative_slope=0.1, threshold=0.5), x34),
    (keras.layers.ReLU(max_value=6), x34),
    (keras.layers.LeakyReLU(0.1), x34),
    (keras.layers.ELU(0.5), x34),
    (keras.layers.PReLU(shared_axes=[1]), normal(2, 3, 4)),
    (keras.layers.Softmax(axis=[1, 2]), normal(2, 3, 4)),
    (keras.layers.Dense(3, activation=keras.layers.LeakyReLU(0.2)), x34),
    (keras.layers.Embedding(9, 4, mask_zero=True), ids),
    (keras.layers.Masking(1.0), normal(2, 3, 4)),
    (keras.layers.Rescaling([0.5, 2.0, 0.1, 1.0], offset=0.5), x34),
    (adapted, normal(3, 4)),
    (keras.layers.Normalization(axis=-1, mean=[1.0, 2, 3, 4], variance=[1.0, 2, 3, 4]), x34),
  ]
  cases += [(getattr(keras.layers, c)(), [x34, normal(3, 4)]) for c in ELEMENTWISE]
  cases += [
    (keras.layers.Add(), [normal(2, 5, 4), normal(2, 4)]),
    (keras.layers.Concatenate(axis=1), [x34, normal(3, 2)]),
    (keras.layers.Dot(axes=(2, 1), normalize=True), [normal(2, 5, 4), normal(2, 4, 3)]),
  ]
  return cases


def test_against_keras_on_tensorflow():
  """The modules against Keras on the TensorFlow backend (one subprocess for every case).

  Bound: rtol 2e-6, atol 1e-7 (measured: at most 7.5e-7 relative, Dot with normalize; the
  transcendental activations 3e-7). TensorFlow's kernels (exp, erf, tanh, log1p, rsqrt,
  reductions) are not XLA's, so those differ in the last bits; the piecewise-linear
  activations, PReLU, Embedding, Masking, Rescaling and the elementwise merges agree exactly.
  """
  from adamjax.testing._keras_subprocess import call_in_keras_backend

  arrays, spec = {}, []
  expected_ours = []
  for i, (layer, inputs) in enumerate(tf_cases()):
    is_list = isinstance(inputs, list)
    xs = inputs if is_list else [inputs]
    layer(inputs)
    if isinstance(layer, keras.layers.PReLU | keras.layers.Dense):
      layer.set_weights([RNG.normal(size=w.shape).astype("float32") for w in layer.get_weights()])
    module = build_module(layer)
    expected_ours.append(np.asarray(jax.jit(lambda x, m=module: m(x))(inputs)))
    arrays |= {f"{i}_x{j}": np.asarray(x) for j, x in enumerate(xs)}
    arrays |= {f"{i}_w{j}": np.asarray(w) for j, w in enumerate(layer.get_weights())}
    spec.append(
      {
        "layer": keras.layers.serialize(layer),
        "num_inputs": len(xs),
        "is_list": is_list,
        "num_weights": len(layer.get_weights()),
      }
    )
  repo = Path(__file__).resolve().parents[1]
  got_tf = call_in_keras_backend(
    "tensorflow",
    __file__,
    "keras_tf_outputs",
    arrays,
    {"cases": spec},
    pythonpath=[repo, repo / "tests"],
  )
  for i, ours in enumerate(expected_ours):
    np.testing.assert_allclose(ours, got_tf[str(i)], rtol=2e-6, atol=1e-7, err_msg=str(spec[i]))
