"""Convolution and pooling layers (adamjax.convert.layers.convolutional, .pooling) against Keras on
the JAX backend: random weights, an option grid per class, outputs compared bit for bit under
jit (both sides compile the same lax calls), one-step gradients within float32 tolerance, and
bad configs refused with a named error."""

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
CF = "channels_first"

# (id, layer factory, input shape). Shapes are small: a case costs two jit compilations.
CONV = [
  ("conv1d-valid", lambda: L.Conv1D(4, 3), (2, 8, 3)),
  ("conv1d-same-s2", lambda: L.Conv1D(4, 3, strides=2, padding="same"), (2, 9, 3)),
  ("conv1d-causal-d2", lambda: L.Conv1D(4, 3, padding="causal", dilation_rate=2), (2, 9, 3)),
  ("conv1d-causal-cf", lambda: L.Conv1D(3, 2, padding="causal", data_format=CF), (2, 3, 7)),
  ("conv1d-groups-relu", lambda: L.Conv1D(4, 3, groups=2, activation="relu"), (2, 8, 6)),
  ("conv1d-nobias", lambda: L.Conv1D(4, 3, use_bias=False, padding="same"), (2, 7, 3)),
  ("conv2d-valid", lambda: L.Conv2D(4, (3, 2)), (2, 7, 6, 3)),
  ("conv2d-same-s21", lambda: L.Conv2D(4, 3, strides=(2, 1), padding="same"), (2, 7, 6, 3)),
  ("conv2d-d2-cf", lambda: L.Conv2D(4, 3, dilation_rate=2, data_format=CF), (2, 3, 8, 8)),
  (
    "conv2d-groups-cf",
    lambda: L.Conv2D(6, 3, groups=3, padding="same", data_format=CF),
    (1, 6, 5, 5),
  ),
  ("conv3d-same-s2", lambda: L.Conv3D(3, 2, strides=2, padding="same"), (1, 5, 4, 4, 2)),
  ("conv3d-cf-nobias", lambda: L.Conv3D(3, 2, data_format=CF, use_bias=False), (1, 2, 4, 4, 3)),
  ("conv1dT-valid", lambda: L.Conv1DTranspose(3, 3), (2, 6, 2)),
  ("conv1dT-s3-k4", lambda: L.Conv1DTranspose(3, 4, strides=3), (2, 5, 2)),
  (
    "conv1dT-same-op1",
    lambda: L.Conv1DTranspose(3, 3, 2, padding="same", output_padding=1),
    (2, 5, 2),
  ),
  ("conv2dT-same-s2", lambda: L.Conv2DTranspose(3, 3, strides=2, padding="same"), (2, 4, 5, 2)),
  ("conv2dT-valid-op", lambda: L.Conv2DTranspose(3, 2, 2, output_padding=(1, 0)), (2, 4, 4, 2)),
  ("conv2dT-d2-cf", lambda: L.Conv2DTranspose(3, 3, dilation_rate=2, data_format=CF), (1, 2, 4, 4)),
  ("conv3dT-same-s2", lambda: L.Conv3DTranspose(2, 3, 2, padding="same"), (1, 3, 3, 3, 2)),
  (
    "conv3dT-cf-nobias",
    lambda: L.Conv3DTranspose(2, 2, data_format=CF, use_bias=False),
    (1, 2, 3, 3, 3),
  ),
  ("dw1d-valid", lambda: L.DepthwiseConv1D(3), (2, 8, 3)),
  ("dw1d-same-s2-m2", lambda: L.DepthwiseConv1D(3, 2, "same", depth_multiplier=2), (2, 9, 3)),
  ("dw1d-cf-d2", lambda: L.DepthwiseConv1D(3, data_format=CF, dilation_rate=2), (2, 3, 9)),
  ("dw2d-same", lambda: L.DepthwiseConv2D(3, padding="same", activation="relu"), (2, 6, 6, 3)),
  (
    "dw2d-s2-m2-nobias",
    lambda: L.DepthwiseConv2D(3, 2, depth_multiplier=2, use_bias=False),
    (2, 7, 7, 2),
  ),
  ("dw2d-cf-same", lambda: L.DepthwiseConv2D((3, 2), padding="same", data_format=CF), (2, 3, 6, 5)),
  ("sep1d-valid", lambda: L.SeparableConv1D(5, 3), (2, 8, 3)),
  ("sep1d-same-s2-m2", lambda: L.SeparableConv1D(5, 3, 2, "same", depth_multiplier=2), (2, 9, 3)),
  ("sep1d-cf-d2", lambda: L.SeparableConv1D(4, 3, data_format=CF, dilation_rate=2), (2, 3, 9)),
  ("sep2d-same", lambda: L.SeparableConv2D(5, 3, padding="same"), (2, 6, 6, 3)),
  ("sep2d-s2-nobias", lambda: L.SeparableConv2D(4, 3, 2, use_bias=False), (2, 7, 7, 2)),
  (
    "sep2d-cf-d2-m2",
    lambda: L.SeparableConv2D(
      4, 3, depth_multiplier=2, dilation_rate=2, padding="same", data_format=CF
    ),
    (1, 3, 7, 7),
  ),
]

POOL = [
  ("max1d", lambda: L.MaxPooling1D(), (2, 7, 3)),
  ("max1d-same-s1-cf", lambda: L.MaxPooling1D(3, 1, "same", data_format=CF), (2, 3, 7)),
  ("max2d-same-s2", lambda: L.MaxPooling2D(3, 2, "same"), (2, 7, 6, 3)),
  ("max2d-cf", lambda: L.MaxPooling2D((2, 3), data_format=CF), (2, 3, 6, 7)),
  ("max3d-same", lambda: L.MaxPooling3D(2, padding="same"), (1, 3, 4, 5, 2)),
  ("max3d-cf-s1", lambda: L.MaxPooling3D(2, 1, data_format=CF), (1, 2, 3, 3, 3)),
  ("avg1d", lambda: L.AveragePooling1D(3), (2, 7, 3)),
  ("avg1d-same-cf", lambda: L.AveragePooling1D(3, 2, "same", data_format=CF), (2, 3, 8)),
  ("avg2d-same-s2", lambda: L.AveragePooling2D(3, 2, "same"), (2, 7, 6, 3)),
  ("avg2d-valid-s1", lambda: L.AveragePooling2D((2, 3), 1), (2, 5, 6, 3)),
  ("avg2d-same-cf", lambda: L.AveragePooling2D(2, padding="same", data_format=CF), (2, 3, 5, 5)),
  ("avg3d-same", lambda: L.AveragePooling3D(2, padding="same"), (1, 3, 4, 5, 2)),
  ("avg3d-cf", lambda: L.AveragePooling3D(2, data_format=CF), (1, 2, 4, 4, 4)),
  ("gmax1d", lambda: L.GlobalMaxPooling1D(), (2, 7, 3)),
  ("gmax1d-cf-keep", lambda: L.GlobalMaxPooling1D(CF, keepdims=True), (2, 3, 7)),
  ("gmax2d-keep", lambda: L.GlobalMaxPooling2D(keepdims=True), (2, 4, 5, 3)),
  ("gmax2d-cf", lambda: L.GlobalMaxPooling2D(CF), (2, 3, 4, 5)),
  ("gmax3d", lambda: L.GlobalMaxPooling3D(), (1, 2, 3, 4, 3)),
  ("gmax3d-cf-keep", lambda: L.GlobalMaxPooling3D(CF, keepdims=True), (1, 3, 2, 3, 4)),
  ("gavg1d", lambda: L.GlobalAveragePooling1D(), (2, 7, 3)),
  ("gavg1d-cf-keep", lambda: L.GlobalAveragePooling1D(CF, keepdims=True), (2, 3, 7)),
  ("gavg2d-keep", lambda: L.GlobalAveragePooling2D(keepdims=True), (2, 4, 5, 3)),
  ("gavg2d-cf", lambda: L.GlobalAveragePooling2D(CF), (2, 3, 4, 5)),
  ("gavg3d", lambda: L.GlobalAveragePooling3D(), (1, 2, 3, 4, 3)),
  ("gavg3d-cf-keep", lambda: L.GlobalAveragePooling3D(CF, keepdims=True), (1, 3, 2, 3, 4)),
]

# One case per class, with non-default options, for the gradient check.
GRAD = [
  "conv1d-causal-d2",
  "conv2d-groups-cf",
  "conv3d-same-s2",
  "conv1dT-same-op1",
  "conv2dT-same-s2",
  "conv3dT-same-s2",
  "dw1d-same-s2-m2",
  "dw2d-cf-same",
  "sep1d-same-s2-m2",
  "sep2d-cf-d2-m2",
  "max2d-same-s2",
  "avg2d-same-s2",
  "avg3d-cf",
  "gmax2d-keep",
  "gavg3d-cf-keep",
]

CLASSES = (
  "Conv1D Conv2D Conv3D Conv1DTranspose Conv2DTranspose Conv3DTranspose DepthwiseConv1D "
  "DepthwiseConv2D SeparableConv1D SeparableConv2D MaxPooling1D MaxPooling2D MaxPooling3D "
  "AveragePooling1D AveragePooling2D AveragePooling3D GlobalMaxPooling1D GlobalMaxPooling2D "
  "GlobalMaxPooling3D GlobalAveragePooling1D GlobalAveragePooling2D GlobalAveragePooling3D"
).split()


def params(cases, only=None):
  return [
    pytest.param(make, shape, id=name) for name, make, shape in cases if not only or name in only
  ]


def built(make, shape, seed=0, dtype="float32"):
  """A built Keras layer with random weights (bias too: Keras initialises it to zeros) and an
  input for it."""
  rng = np.random.default_rng(seed)
  layer = make()
  x = jnp.asarray(rng.normal(size=shape).astype("float32"), dtype=dtype)
  layer(x)
  layer.set_weights([rng.normal(size=w.shape).astype("float32") for w in layer.get_weights()])
  return layer, x


def test_every_class_is_registered():
  assert sorted(c for c in CLASSES if c not in LAYERS) == []


@pytest.mark.parametrize(("make", "shape"), params(CONV + POOL))
def test_bit_identical_to_keras_jax(make, shape):
  layer, x = built(make, shape)
  expected, got = run_both(layer, x)
  assert got.shape == expected.shape and got.dtype == expected.dtype
  np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize(("make", "shape"), params(CONV + POOL, GRAD))
def test_gradients_match_keras(make, shape):
  """d sum(out**2) / d (inputs, every weight), ours against Keras's stateless_call. Measured
  bit-identical on CPU; the tolerance is float32's, as the converter promises no more."""
  layer, x = built(make, shape, seed=1)
  config = layer.get_config()
  cls = LAYERS[type(layer).__name__]
  names = cls.variables(config)
  weights = [v.value for v in layer.trainable_variables]

  def keras_loss(weights, x):
    out, _ = layer.stateless_call(weights, [], x)
    return jnp.sum(out**2)

  def our_loss(weights, x):
    return jnp.sum(cls(config, dict(zip(names, weights, strict=True)))(x) ** 2)

  want = jax.jit(jax.grad(keras_loss, argnums=(0, 1)))(weights, x)
  got = jax.jit(jax.grad(our_loss, argnums=(0, 1)))(weights, x)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("data_format", ["channels_last", CF])
@pytest.mark.parametrize("keepdims", [False, True])
def test_global_average_pooling1d_mask(data_format, keepdims):
  """Keras averages over the unmasked steps only; the output carries no mask."""
  rng = np.random.default_rng(2)
  shape = (3, 6, 4) if data_format == "channels_last" else (3, 4, 6)
  x = rng.normal(size=shape).astype("float32")
  mask = np.array([[1, 1, 0, 1, 0, 0], [1, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1]], bool)
  layer = L.GlobalAveragePooling1D(data_format, keepdims=keepdims)
  expected, got = run_both(layer, x, mask=mask)
  np.testing.assert_array_equal(got, expected)
  module = build_module(layer)
  assert module.supports_masking and module.compute_mask(x, mask) is None
  assert layer.compute_mask(x, mask) is None


@pytest.mark.parametrize(
  ("make", "shape"),
  [
    pytest.param(
      lambda: L.Conv2D(4, 3, padding="same", dtype="mixed_bfloat16"), (2, 5, 5, 3), id="conv2d"
    ),
    pytest.param(
      lambda: L.Conv1D(4, 3, padding="causal", dtype="mixed_float16"), (2, 6, 3), id="conv1d-f16"
    ),
    pytest.param(
      lambda: L.Conv2DTranspose(3, 3, 2, dtype="mixed_bfloat16"), (2, 4, 4, 2), id="conv2dT"
    ),
    pytest.param(lambda: L.DepthwiseConv2D(3, dtype="mixed_bfloat16"), (2, 5, 5, 3), id="dw2d"),
    pytest.param(lambda: L.SeparableConv1D(4, 3, dtype="mixed_bfloat16"), (2, 6, 3), id="sep1d"),
    pytest.param(
      lambda: L.AveragePooling2D(2, padding="same", dtype="mixed_bfloat16"),
      (2, 5, 5, 3),
      id="avg2d",
    ),
    pytest.param(
      lambda: L.GlobalAveragePooling2D(dtype="mixed_float16"), (2, 5, 5, 3), id="gavg2d-f16"
    ),
  ],
)
def test_mixed_precision(make, shape):
  """float32 variables cast to the compute dtype; inputs arrive in it (the graph casts them)."""
  layer, _ = built(make, shape)
  x = jnp.asarray(np.random.default_rng(3).normal(size=shape), dtype=layer.compute_dtype)
  expected, got = run_both(layer, x)
  assert got.dtype == expected.dtype == layer.compute_dtype
  np.testing.assert_array_equal(got, expected)
  assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(nnx.state(build_module(layer))))


def test_depthwise_regularizers_and_constraints_use_keras_option_names():
  """DepthwiseConv's ``kernel`` takes ``depthwise_regularizer``/``depthwise_constraint``."""
  layer, x = built(
    lambda: L.DepthwiseConv2D(
      3, depthwise_regularizer="l2", bias_regularizer="l1", depthwise_constraint="non_neg"
    ),
    (1, 5, 5, 2),
  )
  layer(x)
  module = build_module(layer)
  np.testing.assert_allclose(
    [float(v) for v in module.losses()], [float(v) for v in layer.losses], rtol=1e-6
  )
  module.apply_constraints()
  np.testing.assert_array_equal(module.kernel[...], np.maximum(layer.kernel.numpy(), 0))


BAD = [
  ("Conv2D", {"padding": "causal"}, "padding"),
  ("Conv1D", {"padding": "full"}, "padding"),
  ("Conv1D", {"data_format": "channels_middle"}, "data_format"),
  ("Conv1D", {"strides": [2], "dilation_rate": [2]}, "dilation_rate"),
  ("Conv1D", {"kernel_size": [0]}, "kernel_size"),
  ("Conv1D", {"filters": 5}, "groups"),
  ("Conv1D", {"filters": 8}, "kernel"),
  ("Conv1D", {"lora_rank": 2}, "lora_rank"),
  ("Conv1D", {"use_bias": "yes"}, "use_bias"),
  ("Conv1DTranspose", {"output_padding": [2]}, "output_padding"),
  ("DepthwiseConv1D", {"depth_multiplier": 3}, "kernel"),
  ("SeparableConv1D", {"filters": 3}, "pointwise_kernel"),
  ("MaxPooling1D", {"strides": [0]}, "strides"),
  ("AveragePooling1D", {"padding": "causal"}, "padding"),
  ("GlobalMaxPooling1D", {"keepdims": "no"}, "keepdims"),
]

GOOD = {
  "Conv2D": lambda: L.Conv2D(4, 3),
  "Conv1D": lambda: L.Conv1D(4, 3, groups=2, strides=2),
  "Conv1DTranspose": lambda: L.Conv1DTranspose(4, 3, strides=2),
  "DepthwiseConv1D": lambda: L.DepthwiseConv1D(3, depth_multiplier=2),
  "SeparableConv1D": lambda: L.SeparableConv1D(4, 3, depth_multiplier=2),
  "MaxPooling1D": lambda: L.MaxPooling1D(),
  "AveragePooling1D": lambda: L.AveragePooling1D(2),
  "GlobalMaxPooling1D": lambda: L.GlobalMaxPooling1D(),
}


@pytest.mark.parametrize(("class_name", "change", "named"), BAD, ids=lambda v: str(v))
def test_bad_config_is_refused_with_the_option_named(class_name, change, named):
  make = GOOD.get(class_name, lambda: getattr(L, class_name)(4, 3))
  layer, _ = built(make, (1, 6, 6, 4) if class_name == "Conv2D" else (1, 9, 4))
  config = {**layer.get_config(), **change}
  weights = {w.path.rsplit("/", 1)[-1]: np.asarray(w) for w in layer.weights}
  with pytest.raises(ConversionError, match=named):
    cls = LAYERS[class_name]
    cls(config, {n: weights[n] for n in cls.variables(config) if n in weights})


@pytest.mark.parametrize(
  ("make", "shape", "wrong"),
  [
    pytest.param(lambda: L.Conv1D(4, 3, groups=2), (1, 6, 4), (1, 6, 6), id="conv-groups"),
    pytest.param(lambda: L.Conv1DTranspose(4, 3), (1, 6, 4), (1, 6, 3), id="transpose"),
    pytest.param(lambda: L.DepthwiseConv1D(3), (1, 6, 4), (1, 6, 2), id="depthwise"),
  ],
)
def test_input_with_other_channels_is_refused(make, shape, wrong):
  """Keras fixes the channel count at build; an input with another count is an error."""
  layer, _ = built(make, shape)
  with pytest.raises(ValueError, match="channels"):
    build_module(layer)(jnp.zeros(wrong))
