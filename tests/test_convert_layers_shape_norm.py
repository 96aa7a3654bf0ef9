"""Reshaping, normalization and regularization layers against Keras on the JAX backend.

Every layer's jitted output is compared bit for bit with Keras's (``assert_array_equal``): both
sides run the same jnp/lax operations in the same order. Gradients of ``sum(out**2)`` with
respect to the inputs are compared within float32 tolerance (rtol 1e-6; in practice equal).
Dropout-family layers in training are compared bit for bit with Keras given the same key (the
Keras layer's SeedGenerator state is set to the key our module draws from ``rngs.dropout()``),
and their statistics are checked on their own (kept values are ``x / (1 - rate)``, spatial
dropout drops whole channels, the dropped fraction is the rate within 5 sigma).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import keras
import numpy as np
import pytest
from flax import nnx
from layer_harness import build_module

from adamjax.convert._ir import ConversionError
from adamjax.convert.layers import LAYERS

L = keras.layers
RNG = np.random.default_rng(0)


def _x(*shape, dtype="float32"):
  return RNG.normal(size=shape).astype(dtype)


def _randomize(layer, positive=()):
  """Random normal weights (the default initializers give zeros and ones); the named ones
  positive (variances)."""
  weights = []
  for w in layer.weights:
    value = RNG.normal(size=w.shape).astype(w.dtype)
    if any(w.path.endswith(p) for p in positive):
      value = np.abs(value) + 0.5
    weights.append(value)
  layer.set_weights(weights)


def _both(keras_layer, *inputs, training=False, key=None, **kwargs):
  """``(keras out, keras non-trainable variables, our out, our state)``, both jitted with the
  variables as arguments (Keras through ``stateless_call``), the way a training step runs them.

  (``layer_harness.run_both`` closes over Keras's variables, so XLA constant-folds
  ``rsqrt(variance + epsilon) * gamma`` on the Keras side only: BatchNormalization then differs
  from the same operations on arguments by 1 ulp. Same compilation, same bits.)
  With ``key``, Keras's SeedGenerator state is set to the key our module draws from
  ``rngs=nnx.Rngs(dropout=key)``: Keras's key is that state, ``[seed, counter]``.
  """
  if not keras_layer.built:
    keras_layer.build(inputs[0].shape)
  module = build_module(keras_layer)
  trainable = [v.value for v in keras_layer.trainable_variables]
  non_trainable = [v.value for v in keras_layer.non_trainable_variables]
  if key is not None:
    drawn = jax.random.key_data(nnx.Rngs(dropout=key).dropout())
    non_trainable = [
      drawn if "seed_generator" in v.path else v.value for v in keras_layer.non_trainable_variables
    ]

  @jax.jit
  def keras_fn(trainable, non_trainable, *args):
    # stateless_call hands its keywords to ``call``, which may not take ``training``.
    extra = {"training": True} if training else {}
    return keras_layer.stateless_call(trainable, non_trainable, *args, **extra, **kwargs)

  graphdef, state = nnx.split(module)

  @jax.jit
  def ours(state, key, *args):
    m = nnx.merge(graphdef, state)
    rngs = None if key is None else nnx.Rngs(dropout=key)
    return m(*args, training=training, rngs=rngs, **kwargs), nnx.state(m)

  expected, keras_state = keras_fn(trainable, non_trainable, *inputs)
  got, our_state = ours(state, key, *inputs)
  return np.asarray(expected), keras_state, np.asarray(got), our_state


def _check_grads(keras_layer, x, rtol=1e-6, atol=0.0, key=None, **kwargs):
  """jax.grad of sum(out**2) w.r.t. the inputs: Keras's stateless_call vs ours, both with the
  variables as arguments of the jitted function (``key`` as in :func:`_both`)."""
  trainable = [v.value for v in keras_layer.trainable_variables]
  non_trainable = [v.value for v in keras_layer.non_trainable_variables]
  if key is not None:
    drawn = jax.random.key_data(nnx.Rngs(dropout=key).dropout())
    non_trainable = [
      drawn if "seed_generator" in v.path else v.value for v in keras_layer.non_trainable_variables
    ]
  graphdef, state = nnx.split(build_module(keras_layer))

  def keras_loss(x, trainable, non_trainable):
    out, _ = keras_layer.stateless_call(trainable, non_trainable, x, **kwargs)
    return jnp.sum(jnp.square(out))

  def our_loss(x, state, key):  # a training call updates the BatchStats of the merged module
    rngs = None if key is None else nnx.Rngs(dropout=key)
    return jnp.sum(jnp.square(nnx.merge(graphdef, state)(x, rngs=rngs, **kwargs)))

  expected = jax.jit(jax.grad(keras_loss))(x, trainable, non_trainable)
  got = jax.jit(jax.grad(our_loss, argnums=(0, 1)))(x, state, key)[0]
  np.testing.assert_allclose(got, expected, rtol=rtol, atol=atol)


def _check_masking(keras_layer, x):
  """Keras's supports_masking, and the mask passed on where it is."""
  cls = LAYERS[type(keras_layer).__name__]
  assert cls.supports_masking == keras_layer.supports_masking
  if keras_layer.supports_masking:
    mask = np.ones(x.shape[:-1], bool)
    mask[..., :1] = False
    got = build_module(keras_layer).compute_mask(x, mask)
    np.testing.assert_array_equal(got, keras_layer.compute_mask(x, mask))


# ---------------------------------------------------------------- reshaping

RESHAPING = [
  ("flatten_rank2", lambda: L.Flatten(), (2, 5)),
  ("flatten_rank1", lambda: L.Flatten(), (3,)),
  ("flatten_last", lambda: L.Flatten(), (2, 3, 4, 5)),
  ("flatten_first", lambda: L.Flatten(data_format="channels_first"), (2, 3, 4, 5)),
  ("reshape", lambda: L.Reshape((4, 6)), (2, 3, 8)),
  ("reshape_inferred", lambda: L.Reshape((-1, 2, 2)), (2, 12)),
  ("permute", lambda: L.Permute((2, 1)), (2, 3, 4)),
  ("permute3", lambda: L.Permute((3, 1, 2)), (2, 3, 4, 5)),
  ("repeat_vector", lambda: L.RepeatVector(3), (2, 4)),
  ("zeropad1d", lambda: L.ZeroPadding1D(2), (2, 3, 4)),
  ("zeropad1d_pair", lambda: L.ZeroPadding1D((1, 3)), (2, 3, 4)),
  ("zeropad1d_first", lambda: L.ZeroPadding1D((0, 2), data_format="channels_first"), (2, 3, 4)),
  ("zeropad2d", lambda: L.ZeroPadding2D(1), (2, 3, 4, 2)),
  ("zeropad2d_sym", lambda: L.ZeroPadding2D((1, 2)), (2, 3, 4, 2)),
  (
    "zeropad2d_first",
    lambda: L.ZeroPadding2D(((0, 1), (2, 3)), data_format="channels_first"),
    (2, 2, 3, 4),
  ),
  ("zeropad3d", lambda: L.ZeroPadding3D(((1, 0), (0, 2), 1)), (1, 2, 3, 2, 2)),
  ("zeropad3d_first", lambda: L.ZeroPadding3D(1, data_format="channels_first"), (1, 2, 2, 3, 2)),
  ("crop1d", lambda: L.Cropping1D((1, 2)), (2, 6, 3)),
  ("crop1d_end0", lambda: L.Cropping1D((2, 0)), (2, 6, 3)),
  ("crop2d", lambda: L.Cropping2D(((1, 0), (2, 1))), (2, 5, 6, 2)),
  ("crop2d_int", lambda: L.Cropping2D(1), (2, 5, 6, 2)),
  (
    "crop2d_first",
    lambda: L.Cropping2D(((0, 2), (1, 1)), data_format="channels_first"),
    (2, 2, 5, 6),
  ),
  ("crop3d", lambda: L.Cropping3D(((1, 1), (0, 1), (2, 0))), (1, 4, 4, 5, 2)),
  ("crop3d_first", lambda: L.Cropping3D(1, data_format="channels_first"), (1, 2, 4, 4, 3)),
  ("upsample1d", lambda: L.UpSampling1D(3), (2, 4, 3)),
  ("upsample2d", lambda: L.UpSampling2D((2, 3)), (2, 3, 4, 2)),
  ("upsample2d_first", lambda: L.UpSampling2D(2, data_format="channels_first"), (2, 2, 3, 4)),
  *(
    (
      f"upsample2d_{method}{'_first' if fmt == 'channels_first' else ''}",
      lambda method=method, fmt=fmt: L.UpSampling2D((2, 3), data_format=fmt, interpolation=method),
      (2, 2, 3, 4) if fmt == "channels_first" else (2, 3, 4, 2),
    )
    for method, fmt in (
      ("bilinear", "channels_last"),
      ("bilinear", "channels_first"),
      ("bicubic", "channels_last"),
      ("lanczos3", "channels_first"),
      ("lanczos5", "channels_last"),
    )
  ),
  ("upsample3d", lambda: L.UpSampling3D((1, 2, 3)), (1, 2, 3, 2, 2)),
  ("upsample3d_first", lambda: L.UpSampling3D(2, data_format="channels_first"), (1, 2, 2, 3, 2)),
]


@pytest.mark.parametrize("make, shape", [c[1:] for c in RESHAPING], ids=[c[0] for c in RESHAPING])
def test_reshaping_bit_identical(make, shape):
  layer, x = make(), _x(*shape)
  expected, _, got, _ = _both(layer, x)
  assert got.shape == expected.shape and got.dtype == expected.dtype
  np.testing.assert_array_equal(got, expected)
  _check_grads(layer, x)
  _check_masking(layer, x)


@pytest.mark.parametrize(
  "class_name, config",
  [
    ("Reshape", {"target_shape": [-1, -1]}),
    ("Reshape", {"target_shape": [0, 2]}),
    ("Reshape", {"target_shape": "12"}),
    ("Permute", {"dims": [1, 1]}),
    ("RepeatVector", {"n": 0}),
    ("ZeroPadding2D", {"padding": [[1, 2, 3], [1, 1]]}),
    ("ZeroPadding1D", {"padding": [-1, 1]}),
    ("Cropping3D", {"cropping": [1, 1]}),
    ("UpSampling2D", {"size": [2, 2], "interpolation": "area"}),
    ("UpSampling3D", {"size": [2, 0, 2]}),
    ("Flatten", {"data_format": "channels_middle"}),
  ],
)
def test_reshaping_bad_config(class_name, config):
  with pytest.raises(ConversionError, match=r"config \w+ ="):
    LAYERS[class_name]({**config, "name": "x"}, {})


def test_reshape_and_crop_refuse_misfitting_inputs():
  reshape = LAYERS["Reshape"]({"target_shape": [5, -1]}, {})
  with pytest.raises(ValueError, match="does not fit"):
    reshape(jnp.zeros((2, 12)))
  crop = LAYERS["Cropping1D"]({"cropping": [3, 3]}, {})
  with pytest.raises(ValueError, match="not smaller"):
    crop(jnp.zeros((2, 6, 1)))


# ---------------------------------------------------------------- normalization

BATCH_NORM = [
  ("default", {}, (4, 3)),
  ("axis1_image", {"axis": 1, "momentum": 0.9, "epsilon": 1e-5}, (3, 2, 4, 5)),
  ("no_center", {"center": False}, (4, 5, 3)),
  ("no_scale", {"scale": False}, (4, 5, 3)),
  ("bare", {"center": False, "scale": False, "axis": -2}, (4, 3, 2)),
]


@pytest.mark.parametrize(
  "options, shape", [c[1:] for c in BATCH_NORM], ids=[c[0] for c in BATCH_NORM]
)
def test_batch_norm_inference_and_training(options, shape):
  layer, x = L.BatchNormalization(**options), _x(*shape) * 3 + 1
  layer.build(x.shape)
  _randomize(layer, positive=("moving_variance",))
  expected, _, got, _ = _both(layer, x)
  np.testing.assert_array_equal(got, expected)
  _check_grads(layer, x)

  # Training: batch statistics, and the moving statistics updated in place as Keras does.
  expected, keras_stats, got, state = _both(layer, x, training=True)
  np.testing.assert_array_equal(got, expected)
  np.testing.assert_array_equal(state["mean"][...], keras_stats[0])
  np.testing.assert_array_equal(state["var"][...], keras_stats[1])
  assert not np.array_equal(keras_stats[0], layer.moving_mean.value)  # the update did something
  # Called as a training step calls it (nnx.jit), the module's own statistics move.
  module = build_module(layer)
  got = nnx.jit(lambda m, x: m(x, training=True))(module, x)
  np.testing.assert_array_equal(got, expected)
  np.testing.assert_array_equal(module.mean[...], keras_stats[0])
  np.testing.assert_array_equal(module.var[...], keras_stats[1])
  _check_grads(layer, x, rtol=2e-6, atol=1e-6, training=True)
  _check_masking(layer, x)


def test_batch_norm_masked_training_and_frozen():
  layer, x = L.BatchNormalization(momentum=0.8), _x(3, 5, 4) * 2
  layer.build(x.shape)
  _randomize(layer, positive=("moving_variance",))
  mask = RNG.random((3, 5)) > 0.4
  expected, keras_stats, got, state = _both(layer, x, training=True, mask=mask)
  np.testing.assert_array_equal(got, expected)
  np.testing.assert_array_equal(state["mean"][...], keras_stats[0])
  np.testing.assert_array_equal(state["var"][...], keras_stats[1])

  # trainable=False: Keras normalizes with the moving statistics even in training.
  # (build_module's trainability check does not hold for a frozen layer, whose every variable
  # Keras lists as non-trainable; the module is built from the config directly.)
  layer.trainable = False
  config = layer.get_config()
  assert config["trainable"] is False
  cls = LAYERS["BatchNormalization"]
  module = cls(config, dict(zip(cls.variables(config), layer.get_weights(), strict=True)))
  graphdef, state = nnx.split(module)

  @jax.jit
  def ours(state, x):
    m = nnx.merge(graphdef, state)
    return m(x, training=True), nnx.state(m)

  non_trainable = [v.value for v in layer.non_trainable_variables]
  expected, _ = jax.jit(lambda v, x: layer.stateless_call([], v, x, training=True))(
    non_trainable, x
  )
  got, state = ours(state, x)
  np.testing.assert_array_equal(got, expected)
  np.testing.assert_array_equal(state["mean"][...], layer.moving_mean.value)


def test_batch_norm_names_and_refusals():
  layer = L.BatchNormalization()
  layer.build((2, 3))
  module = build_module(layer)
  # Flax's own nnx.BatchNorm has the same state paths and kinds.
  flax_bn = nnx.BatchNorm(3, rngs=nnx.Rngs(0))
  ours = jax.tree.map(jnp.shape, nnx.state(module, nnx.Param, nnx.BatchStat))
  theirs = jax.tree.map(jnp.shape, nnx.state(flax_bn, nnx.Param, nnx.BatchStat))
  assert ours == theirs
  for option in ("renorm", "synchronized"):
    with pytest.raises(ConversionError, match=option):
      LAYERS["BatchNormalization"].variables({option: True})


def test_batch_norm_mixed_float16():
  layer, x = L.BatchNormalization(dtype="mixed_float16"), _x(4, 3)
  layer.build(x.shape)
  _randomize(layer, positive=("moving_variance",))
  x16 = x.astype("float16")  # the graph runner casts inputs to the compute dtype
  expected, _, got, _ = _both(layer, x16)
  assert got.dtype == expected.dtype == np.float16
  np.testing.assert_array_equal(got, expected)
  expected, keras_stats, got, state = _both(layer, x16, training=True)
  np.testing.assert_array_equal(got, expected)
  assert state["mean"][...].dtype == np.float32
  np.testing.assert_array_equal(state["var"][...], keras_stats[1])


NORMS = [
  ("ln_default", lambda: L.LayerNormalization(), (2, 3, 4)),
  ("ln_axes", lambda: L.LayerNormalization(axis=[1, 2], epsilon=1e-5), (2, 3, 4)),
  ("ln_axis1", lambda: L.LayerNormalization(axis=1), (2, 3, 4)),
  ("ln_no_center", lambda: L.LayerNormalization(center=False), (2, 5)),
  ("ln_no_scale", lambda: L.LayerNormalization(scale=False), (2, 5)),
  ("ln_rms", lambda: L.LayerNormalization(rms_scaling=True), (2, 3, 4)),
  ("gn_default", lambda: L.GroupNormalization(groups=2), (2, 3, 4)),
  ("gn_instance", lambda: L.GroupNormalization(groups=-1, epsilon=1e-5), (2, 3, 3, 4)),
  ("gn_first", lambda: L.GroupNormalization(groups=3, axis=1), (2, 6, 3, 2)),
  ("gn_one_group_bare", lambda: L.GroupNormalization(1, center=False, scale=False), (2, 5, 4)),
  ("unit_default", lambda: L.UnitNormalization(), (2, 3, 4)),
  ("unit_axes", lambda: L.UnitNormalization(axis=[1, 2]), (2, 3, 4)),
]


# Keras warns that its rms_scaling is deprecated (it scales by the variance); we build it as is.
@pytest.mark.filterwarnings("ignore:You passed `rms_scaling=True`")
@pytest.mark.parametrize("make, shape", [c[1:] for c in NORMS], ids=[c[0] for c in NORMS])
def test_norms_bit_identical(make, shape):
  layer, x = make(), _x(*shape) * 2 + 0.5
  layer.build(x.shape)
  _randomize(layer)
  expected, _, got, _ = _both(layer, x)
  np.testing.assert_array_equal(got, expected)
  _check_grads(layer, x, rtol=1e-5, atol=1e-6)
  _check_masking(layer, x)


def test_layer_norm_positive_last_axis():
  # axis == [ndim - 1]: Keras broadcasts gamma/beta implicitly (rank promotion, which the test
  # configuration otherwise forbids); the module reshapes them, the same broadcast.
  layer, x = L.LayerNormalization(axis=2), _x(2, 3, 4)
  layer.build(x.shape)
  _randomize(layer)
  with jax.numpy_rank_promotion("allow"):
    expected, _, got, _ = _both(layer, x)
  np.testing.assert_array_equal(got, expected)


def test_norms_mixed_bfloat16():
  for layer in (
    L.LayerNormalization(dtype="mixed_bfloat16"),
    L.GroupNormalization(2, dtype="mixed_bfloat16"),
  ):
    x = _x(2, 3, 4).astype(jnp.bfloat16)
    layer.build(x.shape)
    _randomize(layer)
    expected, _, got, _ = _both(layer, x)
    assert got.dtype == expected.dtype
    np.testing.assert_array_equal(got, expected)


# ---------------------------------------------------------------- regularization

RANDOM = [
  ("dropout", lambda: L.Dropout(0.3), (4, 6, 5)),
  ("dropout_noise_shape", lambda: L.Dropout(0.5, noise_shape=(None, 1, 5)), (4, 6, 5)),
  ("dropout_all", lambda: L.Dropout(1.0), (4, 5)),
  ("spatial1d", lambda: L.SpatialDropout1D(0.4), (4, 6, 5)),
  ("spatial2d", lambda: L.SpatialDropout2D(0.4), (4, 3, 3, 5)),
  ("spatial2d_first", lambda: L.SpatialDropout2D(0.4, data_format="channels_first"), (4, 5, 3, 3)),
  ("spatial3d", lambda: L.SpatialDropout3D(0.4), (2, 2, 3, 2, 5)),
  (
    "spatial3d_first",
    lambda: L.SpatialDropout3D(0.4, data_format="channels_first"),
    (2, 5, 2, 3, 2),
  ),
  ("gaussian_noise", lambda: L.GaussianNoise(0.3), (4, 5)),
  ("gaussian_dropout", lambda: L.GaussianDropout(0.3), (4, 5)),
  ("alpha_dropout", lambda: L.AlphaDropout(0.3), (4, 6, 5)),
  ("alpha_dropout_noise_shape", lambda: L.AlphaDropout(0.3, noise_shape=(4, 1, 5)), (4, 6, 5)),
  # Under a mixed policy the inputs arrive in the compute dtype; noise is drawn in it too.
  ("dropout_f16", lambda: L.Dropout(0.3, dtype="mixed_float16"), (4, 5)),
  ("gaussian_noise_bf16", lambda: L.GaussianNoise(0.3, dtype="mixed_bfloat16"), (4, 5)),
  ("gaussian_dropout_f16", lambda: L.GaussianDropout(0.3, dtype="mixed_float16"), (4, 5)),
  ("alpha_dropout_bf16", lambda: L.AlphaDropout(0.3, dtype="mixed_bfloat16"), (4, 5)),
]


GRADIENT_CASES = (
  "dropout_noise_shape",
  "spatial2d",
  "gaussian_noise",
  "gaussian_dropout",
  "alpha_dropout",
)


@pytest.mark.parametrize("make, shape", [c[1:] for c in RANDOM], ids=[c[0] for c in RANDOM])
def test_random_layers_same_key_bit_identical(make, shape):
  layer = make()
  x = _x(*shape).astype(layer.compute_dtype)
  # Inference: the identity, on both sides.
  expected, _, got, _ = _both(layer, x)
  np.testing.assert_array_equal(got, expected)
  np.testing.assert_array_equal(got, x)
  _check_masking(layer, x)
  # Training, from the same key.
  expected, _, got, _ = _both(layer, x, training=True, key=jax.random.key(7))
  assert got.dtype == expected.dtype == x.dtype
  np.testing.assert_array_equal(got, expected)
  assert not np.array_equal(got, x)


@pytest.mark.parametrize(
  "make, shape",
  [c[1:] for c in RANDOM if c[0] in GRADIENT_CASES],
  ids=[c[0] for c in RANDOM if c[0] in GRADIENT_CASES],
)
def test_random_layers_training_gradients(make, shape):
  layer, x = make(), _x(*shape)
  layer.build(x.shape)
  _check_grads(layer, x, key=jax.random.key(11), training=True)


def test_dropout_statistics():
  x = jnp.asarray(RNG.uniform(1.0, 2.0, size=(200, 50)).astype("float32"))
  rngs = nnx.Rngs(dropout=3)
  for rate in (0.1, 0.5, 0.8):
    module = LAYERS["Dropout"]({"rate": rate}, {})
    out = np.asarray(module(x, training=True, rngs=rngs))
    kept = out != 0
    np.testing.assert_array_equal(out[kept], np.asarray(x / (1.0 - rate))[kept])
    n = x.size
    assert abs((~kept).mean() - rate) < 5 * np.sqrt(rate * (1 - rate) / n)
  # Two calls draw different masks; rate 0 is the identity (no key needed).
  module = LAYERS["Dropout"]({"rate": 0.5}, {})
  assert not np.array_equal(
    module(x, training=True, rngs=rngs), module(x, training=True, rngs=rngs)
  )
  np.testing.assert_array_equal(LAYERS["Dropout"]({"rate": 0.0}, {})(x, training=True), x)
  with pytest.raises(ValueError, match="rngs"):
    module(x, training=True)


@pytest.mark.parametrize("fmt", ["channels_last", "channels_first"])
def test_spatial_dropout_drops_whole_channels(fmt):
  x = jnp.asarray(RNG.uniform(1.0, 2.0, size=(64, 8, 4, 4)).astype("float32"))
  module = LAYERS["SpatialDropout2D"]({"rate": 0.5, "data_format": fmt}, {})
  out = np.asarray(module(x, training=True, rngs=nnx.Rngs(dropout=1)))
  spatial = (2, 3) if fmt == "channels_first" else (1, 2)
  dropped = (out == 0).all(axis=spatial)
  kept = (out != 0).all(axis=spatial)
  assert (dropped | kept).all()  # each (sample, channel) is dropped or kept whole
  assert abs(dropped.mean() - 0.5) < 5 * np.sqrt(0.25 / dropped.size)
  np.testing.assert_array_equal(out[out != 0], np.asarray(x * 2)[out != 0])


def test_noise_statistics():
  x = jnp.ones((400, 100), jnp.float32)
  rngs = nnx.Rngs(dropout=5)
  noise = np.asarray(LAYERS["GaussianNoise"]({"stddev": 0.3}, {})(x, training=True, rngs=rngs)) - 1
  assert abs(noise.mean()) < 5 * 0.3 / 200 and abs(noise.std() - 0.3) < 0.01
  out = np.asarray(LAYERS["GaussianDropout"]({"rate": 0.2}, {})(x, training=True, rngs=rngs))
  assert abs(out.mean() - 1) < 0.01 and abs(out.std() - np.sqrt(0.2 / 0.8)) < 0.01
  # AlphaDropout keeps a standard normal input's mean and variance.
  z = jnp.asarray(RNG.normal(size=(400, 100)).astype("float32"))
  out = np.asarray(LAYERS["AlphaDropout"]({"rate": 0.2}, {})(z, training=True, rngs=rngs))
  assert abs(out.mean()) < 0.02 and abs(out.std() - 1) < 0.02


def test_activity_regularization():
  layer, x = L.ActivityRegularization(l1=0.01, l2=0.002), _x(3, 4)
  expected, _, got, _ = _both(layer, x)  # Keras's call takes no training argument
  np.testing.assert_array_equal(got, expected)
  np.testing.assert_array_equal(got, x)
  np.testing.assert_array_equal(build_module(layer)(x, training=True), x)
  _check_masking(layer, x)
  module = build_module(layer)
  assert module.activity_regularizer == ("L1L2", (("l1", 0.01), ("l2", 0.002)))


@pytest.mark.parametrize(
  "class_name, config",
  [
    ("Dropout", {"rate": 1.5}),
    ("Dropout", {"rate": "half"}),
    ("Dropout", {"rate": 0.5, "noise_shape": [None, 0]}),
    ("GaussianNoise", {"stddev": -1}),
    ("SpatialDropout2D", {"rate": 0.5, "data_format": "NHWC"}),
    ("BatchNormalization", {"axis": "last"}),
    ("LayerNormalization", {"axis": [1, "2"]}),
    ("GroupNormalization", {"groups": 0}),
    ("LayerNormalization", {"epsilon": "tiny"}),
  ],
)
def test_shape_norm_bad_config(class_name, config):
  cls = LAYERS[class_name]
  with pytest.raises(ConversionError, match=r"config \w+ ="):
    cls(config, {name: np.ones(3, np.float32) for name in cls.variables(config)})
