"""A zoo of small Keras 3 models of the kinds people port, and the converter's checks on each.

Each builder returns ``(model, sample)``: a compiled Keras model (built with fixed seeds, small
shapes) and ``sample(rng, n) -> (inputs, targets)``, lists of NumPy arrays for its inputs and
outputs. :data:`ZOO` maps a name to its :class:`Entry` (the builder, the loss our side computes
and what the comparison may expect). :func:`check` runs the whole story on one model: Keras
``fit`` for two steps, ``.keras`` saved, ``adamjax.convert.flax_model``, logits and one-step
gradients against Keras on the JAX backend (both jitted), and the Keras -> JAX -> Keras round
trip; it returns a :class:`Report` (the tests assert on it, ``benchmarks/convert_zoo.py`` prints
it). :func:`tf_logits` runs in a Keras-on-TensorFlow subprocess
(``adamjax.testing.call_in_keras_backend``).

Keras is imported inside the functions, so the caller's ``KERAS_BACKEND`` decides the backend.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

BATCH = 4  # fit runs two steps of this batch size
# Layers that draw random numbers in training mode: with one of them (or a dropout or
# recurrent_dropout option above 0), gradients are compared in inference mode (Keras's seed
# generator and nnx.Rngs draw different masks).
STOCHASTIC = {
  "Dropout",
  "SpatialDropout1D",
  "SpatialDropout2D",
  "SpatialDropout3D",
  "GaussianNoise",
  "GaussianDropout",
  "AlphaDropout",
}


@dataclasses.dataclass(frozen=True)
class Entry:
  """A zoo model and what its checks expect.

  Attributes:
    build: ``() -> (compiled keras model, sample)``.
    loss: per output, the loss our side computes (a key of :func:`_losses`: ``mse``,
      ``sce_logits``, ``sce_probs``, ``bce_logits``), the same as the model compiles.
    logit_bound: 0.0 where our logits are bit-identical to Keras-JAX; otherwise the max
      |difference| allowed, with ``why``.
    grad_rtol: max over variables of max|ours - Keras| / max|Keras| for one-step gradients.
    why: the reason for a non-zero bound.
    optimizer: the compiled optimizer's class ("Adam" unless the model is about another one).
    in_suite: False for a model too slow for the test suite (the benchmark still runs it).
  """

  build: Callable[[], tuple[Any, Callable]]
  loss: tuple[str, ...]
  logit_bound: float = 0.0
  grad_rtol: float = 1e-5
  why: str = ""
  optimizer: str = "Adam"
  in_suite: bool = True


ZOO: dict[str, Entry] = {}


def zoo(name: str, *loss: str, **expect: Any):
  """Registers a builder in :data:`ZOO` as ``name`` (``loss`` and ``expect``: see Entry)."""

  def register(fn):
    ZOO[name] = Entry(fn, loss, **expect)
    return fn

  return register


def _seed(seed: int = 0):
  import keras

  keras.utils.set_random_seed(seed)
  return keras


def _compile(model, loss, optimizer=None, **kwargs):
  import keras

  model.compile(optimizer=optimizer or keras.optimizers.Adam(1e-3), loss=loss, **kwargs)
  return model


def _normal(*shape):
  return lambda rng, n: rng.normal(size=(n, *shape)).astype("float32")


def _labels(classes, *shape):
  return lambda rng, n: rng.integers(0, classes, size=(n, *shape)).astype("int32")


def _sample(inputs, targets):
  return lambda rng, n: ([f(rng, n) for f in inputs], [f(rng, n) for f in targets])


def _sce(from_logits=True):
  import keras

  return keras.losses.SparseCategoricalCrossentropy(from_logits=from_logits)


# --- text -----------------------------------------------------------------------------------


def _tokens(vocab, length):
  """Token ids with trailing zero padding (mask_zero) of random length, at least 2 real tokens."""

  def f(rng, n):
    ids = rng.integers(1, vocab, size=(n, length))
    keep = rng.integers(2, length + 1, size=(n, 1))
    return np.where(np.arange(length)[None, :] < keep, ids, 0).astype("int32")

  return f


@zoo("tutorial_mlp", "sce_logits")
def tutorial_mlp():
  from adamjax import testing

  keras = _seed()
  model = testing.tutorial_mlp(keras, optimizer=keras.optimizers.Adam(1e-3), hidden=32)
  return model, _sample([_normal(28, 28)], [_labels(10)])


@zoo("text_conv1d", "bce_logits")
def text_conv1d():
  keras = _seed()
  L = keras.layers
  x = keras.Input((12,), dtype="int32")
  # Keras warns that Conv1D drops the mask: GlobalAveragePooling1D averages every step.
  h = L.Conv1D(16, 3, padding="same", activation="relu")(L.Embedding(40, 8, mask_zero=True)(x))
  model = keras.Model(x, L.Dense(1)(L.GlobalAveragePooling1D()(h)))
  _compile(model, keras.losses.BinaryCrossentropy(from_logits=True))
  return model, _sample([_tokens(40, 12)], [_labels(2, 1)])


@zoo("text_masked_pool", "sce_logits")
def text_masked_pool():
  """A bag of embeddings: the mask reaches GlobalAveragePooling1D (Keras writes it into the
  Functional config as a ``NotEqual`` operation node feeding the pooling's ``mask``)."""
  keras = _seed()
  L = keras.layers
  x = keras.Input((12,), dtype="int32")
  h = L.GlobalAveragePooling1D()(L.Embedding(40, 8, mask_zero=True)(x))
  model = keras.Model(x, L.Dense(3)(h))
  _compile(model, _sce())
  return model, _sample([_tokens(40, 12)], [_labels(3)])


@zoo("text_lstm", "sce_logits")
def text_lstm():
  keras = _seed()
  L = keras.layers
  x = keras.Input((10,), dtype="int32")
  h = L.LSTM(8)(L.Embedding(30, 8, mask_zero=True)(x))
  model = keras.Model(x, L.Dense(3)(h))
  _compile(model, _sce())
  return model, _sample([_tokens(30, 10)], [_labels(3)])


@zoo("transformer_encoder", "sce_logits")
def transformer_encoder():
  keras = _seed()
  L = keras.layers
  x = keras.Input((10,), dtype="int32")
  h = L.Embedding(30, 16)(x)
  a = L.MultiHeadAttention(num_heads=2, key_dim=8, dropout=0.1)(h, h, use_causal_mask=True)
  h = L.LayerNormalization(epsilon=1e-6)(L.Add()([h, L.Dropout(0.1)(a)]))
  f = L.Dense(16)(L.Dense(32, activation="relu")(h))
  h = L.LayerNormalization(epsilon=1e-6)(L.Add()([h, L.Dropout(0.1)(f)]))
  model = keras.Model(x, L.Dense(4)(L.GlobalAveragePooling1D()(h)))
  _compile(model, _sce())
  return model, _sample([_labels(30, 10)], [_labels(4)])


@zoo("einsum_dense", "mse")
def einsum_dense():
  keras = _seed()
  L = keras.layers
  x = keras.Input((6, 8))
  h = L.EinsumDense("abc,cd->abd", output_shape=(None, 12), bias_axes="d", activation="gelu")(x)
  h = L.EinsumDense("abd,de->ae", output_shape=(5,), bias_axes="e")(h)
  model = keras.Model(x, L.Dense(3)(h))
  _compile(model, "mse")
  return model, _sample([_normal(6, 8)], [_normal(3)])


# --- sequences ------------------------------------------------------------------------------


def _padded(steps, features):
  """Sequences whose trailing steps are all-zero (Masking(0.0) masks them)."""

  def f(rng, n):
    x = rng.normal(size=(n, steps, features)).astype("float32")
    keep = rng.integers(2, steps + 1, size=(n, 1, 1))
    return np.where(np.arange(steps)[None, :, None] < keep, x, 0).astype("float32")

  return f


@zoo("lstm_masking", "mse")
def lstm_masking():
  keras = _seed()
  L = keras.layers
  model = keras.Sequential([keras.Input((8, 4)), L.Masking(0.0), L.LSTM(8), L.Dense(3)])
  _compile(model, "mse")
  return model, _sample([_padded(8, 4)], [_normal(3)])


@zoo("gru_masking", "mse")
def gru_masking():
  keras = _seed()
  L = keras.layers
  model = keras.Sequential(
    [keras.Input((8, 4)), L.Masking(0.0), L.GRU(8, reset_after=False), L.Dense(3)]
  )
  _compile(model, "mse")
  return model, _sample([_padded(8, 4)], [_normal(3)])


@zoo("bilstm_tagger", "sce_logits")
def bilstm_tagger():
  keras = _seed()
  L = keras.layers
  x = keras.Input((9,), dtype="int32")
  h = L.Embedding(25, 8)(x)
  h = L.Bidirectional(L.LSTM(6, return_sequences=True))(h)
  model = keras.Model(x, L.Dense(5)(h))
  _compile(model, _sce())
  return model, _sample([_labels(25, 9)], [_labels(5, 9)])


@zoo("masked_tagger", "sce_logits")
def masked_tagger():
  """A tagger on padded sentences: the output keeps Embedding's mask and Keras's loss averages
  over the real tokens only."""
  keras = _seed()
  L = keras.layers
  x = keras.Input((9,), dtype="int32")
  h = L.Embedding(25, 8, mask_zero=True)(x)
  h = L.Bidirectional(L.GRU(6, return_sequences=True), merge_mode="sum")(h)
  model = keras.Model(x, L.Dense(5)(h))
  _compile(model, _sce())
  return model, _sample([_tokens(25, 9)], [_labels(5, 9)])


@zoo("simplernn_state", "mse")
def simplernn_state():
  keras = _seed()
  L = keras.layers
  x = keras.Input((7, 3))
  h = L.SimpleRNN(6, return_sequences=True)(x)
  seq, state = L.SimpleRNN(5, return_sequences=True, return_state=True)(h)
  last = L.SimpleRNN(5, go_backwards=True)(seq, initial_state=[state])
  model = keras.Model(x, L.Dense(2)(L.Concatenate()([last, state])))
  _compile(model, "mse")
  return model, _sample([_normal(7, 3)], [_normal(2)])


@zoo("seq2seq_repeat", "mse")
def seq2seq_repeat():
  keras = _seed()
  L = keras.layers
  model = keras.Sequential(
    [
      keras.Input((6, 3)),
      L.LSTM(8),
      L.RepeatVector(4),
      L.GRU(8, return_sequences=True),
      L.Dense(3),
    ]
  )
  _compile(model, "mse")
  return model, _sample([_normal(6, 3)], [_normal(4, 3)])


@zoo("causal_conv1d", "mse")
def causal_conv1d():
  keras = _seed()
  L = keras.layers
  x = keras.Input((16, 2))
  h = L.Conv1D(8, 2, padding="causal", activation="relu")(x)
  r = L.Conv1D(8, 2, padding="causal", dilation_rate=2, activation="tanh")(h)
  h = L.LayerNormalization()(L.Add()([h, r]))
  h = L.Conv1D(8, 2, padding="causal", dilation_rate=4)(h)
  model = keras.Model(x, L.Dense(1)(h))
  _compile(model, "mse")
  return model, _sample([_normal(16, 2)], [_normal(16, 1)])


@zoo("dense_attention", "sce_logits")
def dense_attention():
  keras = _seed()
  L = keras.layers
  q, v = keras.Input((5, 8)), keras.Input((7, 8))
  k = L.Dense(8)(v)
  a = L.Attention(use_scale=True)([q, v, k])
  b = L.AdditiveAttention()([q, v])
  h = L.Concatenate()([L.GlobalAveragePooling1D()(a), L.GlobalMaxPooling1D()(b)])
  model = keras.Model([q, v], L.Dense(3)(h))
  _compile(model, _sce())
  return model, _sample([_normal(5, 8), _normal(7, 8)], [_labels(3)])


# --- vision ---------------------------------------------------------------------------------


@zoo("cnn_bn_dropout", "sce_logits")
def cnn_bn_dropout():
  keras = _seed()
  L = keras.layers
  x = keras.Input((12, 12, 3))
  h = L.Conv2D(8, 3, activation="relu")(x)
  h = L.BatchNormalization()(h)
  h = L.MaxPooling2D()(h)
  h = L.Conv2D(16, 3, padding="same", use_bias=False)(h)
  h = L.Activation("relu")(L.BatchNormalization(momentum=0.9, epsilon=1e-5)(h))
  h = L.Dropout(0.3)(L.GlobalAveragePooling2D()(h))
  model = keras.Model(x, L.Dense(10)(h))
  _compile(model, _sce())
  return model, _sample([_normal(12, 12, 3)], [_labels(10)])


@zoo("unet", "sce_logits")
def unet():
  keras = _seed()
  L = keras.layers
  x = keras.Input((16, 16, 3))
  c1 = L.Conv2D(8, 3, padding="same", activation="relu")(x)
  c2 = L.Conv2D(16, 3, padding="same", activation="relu")(L.MaxPooling2D()(c1))
  b = L.Conv2D(16, 3, padding="same", activation="relu")(L.MaxPooling2D()(c2))
  u2 = L.Concatenate()([L.UpSampling2D()(b), c2])
  u2 = L.Conv2D(16, 3, padding="same", activation="relu")(u2)
  u1 = L.Concatenate()([L.Conv2DTranspose(8, 2, strides=2, padding="same")(u2), c1])
  model = keras.Model(x, L.Conv2D(3, 1)(L.Conv2D(8, 3, padding="same", activation="relu")(u1)))
  _compile(model, _sce())
  return model, _sample([_normal(16, 16, 3)], [_labels(3, 16, 16)])


@zoo("separable_depthwise", "sce_logits")
def separable_depthwise():
  keras = _seed()
  L = keras.layers
  model = keras.Sequential(
    [
      keras.Input((12, 12, 3)),
      L.SeparableConv2D(8, 3, depth_multiplier=2, activation="relu"),
      L.DepthwiseConv2D(3, strides=2, padding="same", activation="relu6"),
      L.Conv2D(12, 1),
      L.Reshape((-1, 12)),
      L.SeparableConv1D(8, 3, padding="same"),
      L.DepthwiseConv1D(3),
      L.GlobalMaxPooling1D(),
      L.Dense(5),
    ]
  )
  _compile(model, _sce())
  return model, _sample([_normal(12, 12, 3)], [_labels(5)])


@zoo("channels_first_cnn", "sce_logits")
def channels_first_cnn():
  keras = _seed()
  L = keras.layers
  cf = "channels_first"
  model = keras.Sequential(
    [
      keras.Input((3, 10, 10)),
      L.ZeroPadding2D(1, data_format=cf),
      L.Conv2D(6, 3, strides=2, data_format=cf),
      L.BatchNormalization(axis=1),
      L.ReLU(),
      L.AveragePooling2D(2, data_format=cf),
      L.Conv2D(8, 2, padding="same", data_format=cf, activation="elu"),
      L.GlobalMaxPooling2D(data_format=cf),
      L.Dense(4),
    ]
  )
  _compile(model, _sce())
  return model, _sample([_normal(3, 10, 10)], [_labels(4)])


@zoo("cnn3d", "sce_logits")
def cnn3d():
  keras = _seed()
  L = keras.layers
  model = keras.Sequential(
    [
      keras.Input((6, 6, 6, 2)),
      L.Conv3D(4, 3, padding="same", activation="relu"),
      L.MaxPooling3D(),
      L.Conv3D(6, 2),
      L.GlobalAveragePooling3D(),
      L.Dense(3),
    ]
  )
  _compile(model, _sce())
  return model, _sample([_normal(6, 6, 6, 2)], [_labels(3)])


@zoo("preprocessing", "mse")
def preprocessing():
  keras = _seed()
  L = keras.layers
  rng = np.random.default_rng(1)
  images = rng.uniform(0, 255, size=(32, 6, 6, 3)).astype("float32")
  table = (rng.normal(size=(32, 5)) * 3 + 2).astype("float32")
  rescale = L.Rescaling(1 / 127.5, offset=-1.0)
  norm_image = L.Normalization(axis=-1)
  norm_image.adapt(np.asarray(rescale(images)))
  norm_table = L.Normalization()
  norm_table.adapt(table)
  img, tab = keras.Input((6, 6, 3)), keras.Input((5,))
  h = L.Flatten()(L.Conv2D(4, 3)(norm_image(rescale(img))))
  h = L.Concatenate()([h, norm_table(tab)])
  model = keras.Model([img, tab], L.Dense(2)(h))
  _compile(model, "mse")

  def sample(rng, n):
    x = [rng.uniform(0, 255, size=(n, 6, 6, 3)), rng.normal(size=(n, 5)) * 3 + 2]
    return [a.astype("float32") for a in x], [_normal(2)(rng, n)]

  return model, sample


@zoo("regularized", "mse")
def regularized():
  keras = _seed()
  L, R, C = keras.layers, keras.regularizers, keras.constraints
  model = keras.Sequential(
    [
      keras.Input((6,)),
      L.Dense(
        12,
        activation="relu",
        kernel_regularizer=R.L2(1e-2),
        bias_regularizer=R.L1(1e-3),
        activity_regularizer=R.L1L2(l1=1e-3, l2=1e-3),
        kernel_constraint=C.MaxNorm(1.5),
      ),
      L.Dense(8, kernel_constraint=C.NonNeg(), bias_constraint=C.UnitNorm(axis=0)),
      L.Dense(
        2,
        kernel_regularizer=R.OrthogonalRegularizer(0.01),
        kernel_constraint=C.MinMaxNorm(0.5, 1.0),
      ),
    ]
  )
  _compile(model, "mse")
  return model, _sample([_normal(6)], [_normal(2)])


@zoo("mixed_float16", "sce_logits")
def mixed_float16():
  keras = _seed()
  L = keras.layers
  keras.mixed_precision.set_global_policy("mixed_float16")
  try:
    x = keras.Input((8, 8, 3))
    h = L.Conv2D(8, 3, activation="relu")(x)
    h = L.BatchNormalization()(h)
    h = L.Dense(6, activation="relu")(L.GlobalAveragePooling2D()(h))
    model = keras.Model(x, L.Activation("linear", dtype="float32")(L.Dense(4)(h)))
  finally:
    keras.mixed_precision.set_global_policy("float32")
  # auto_scale_loss=False: Keras would wrap Adam in a LossScaleOptimizer, whose state the
  # converter does not carry (a different slot layout).
  _compile(model, _sce(), auto_scale_loss=False)
  return model, _sample([_normal(8, 8, 3)], [_labels(4)])


@zoo("frozen_base", "sce_logits")
def frozen_base():
  """Transfer learning: a frozen nested base (its BatchNormalization in inference mode) and a
  trained head; Keras keeps no Adam slots for the base."""
  keras = _seed()
  L = keras.layers
  base = keras.Sequential(
    [
      keras.Input((10, 10, 3)),
      L.Conv2D(8, 3, activation="relu"),
      L.BatchNormalization(),
      L.MaxPooling2D(),
    ],
    name="base",
  )
  base.trainable = False
  x = keras.Input((10, 10, 3))
  h = L.GlobalAveragePooling2D()(base(x, training=False))
  model = keras.Model(x, L.Dense(4)(L.Dense(8, activation="relu")(h)))
  _compile(model, _sce())
  return model, _sample([_normal(10, 10, 3)], [_labels(4)])


@zoo("multi_io_shared", "sce_logits", "mse")
def multi_io_shared():
  keras = _seed()
  L = keras.layers
  a, b = keras.Input((6,), name="a"), keras.Input((6,), name="b")
  shared = L.Dense(8, activation="tanh", name="shared")
  tower = keras.Sequential([keras.Input((16,)), L.Dense(8, activation="relu"), L.Dense(8)])
  h = tower(L.Concatenate()([shared(a), shared(b)]))
  out1 = L.Dense(3, name="label")(h)
  out2 = L.Dense(1, name="score")(L.Subtract()([shared(a), shared(b)]))
  model = keras.Model([a, b], [out1, out2])
  _compile(model, [_sce(), "mse"])
  return model, _sample([_normal(6), _normal(6)], [_labels(3), _normal(1)])


@zoo("sgd_cnn", "sce_logits", optimizer="SGD")
def sgd_cnn():
  keras = _seed()
  L = keras.layers
  model = keras.Sequential(
    [
      keras.Input((8, 8, 1)),
      L.Conv2D(4, 3, activation="relu"),
      L.Flatten(),
      L.Dense(3),
    ]
  )
  _compile(model, _sce(), optimizer=keras.optimizers.SGD(0.01, momentum=0.9))
  return model, _sample([_normal(8, 8, 1)], [_labels(3)])


@zoo("misc_layers", "mse")
def misc_layers():
  keras = _seed()
  L = keras.layers
  x = keras.Input((8, 8, 4))
  h = L.Conv2D(8, 3, padding="same")(x)
  h = L.GroupNormalization(groups=4)(h)
  h = L.PReLU()(L.LeakyReLU(0.1)(h))
  h = L.Cropping2D(1)(L.SpatialDropout2D(0.2)(h))
  g = L.Multiply()([h, L.Activation("sigmoid")(h)])
  h = L.Maximum()([L.Average()([h, g]), L.Minimum()([h, g])])
  h = L.UnitNormalization()(L.GaussianNoise(0.1)(L.Flatten()(h)))
  h = L.Permute((2, 1))(L.Reshape((8, -1))(h))
  model = keras.Model(x, L.Dense(2)(L.Flatten()(h)))
  _compile(model, "mse")
  return model, _sample([_normal(8, 8, 4)], [_normal(2)])


# --- applications ---------------------------------------------------------------------------


# ~50 s of CPU (fit and the training-mode gradients of 155 layers): benchmark only, like
# EfficientNetB0 below.
@zoo("mobilenet_v2", "sce_probs", in_suite=False)
def mobilenet_v2():
  keras = _seed()
  model = keras.applications.MobileNetV2(
    weights=None, alpha=0.35, input_shape=(32, 32, 3), classes=10
  )
  _compile(model, _sce(from_logits=False))
  return model, _sample([_normal(32, 32, 3)], [_labels(10)])


# ~80 s of CPU (fit and four compilations of 239 layers): the benchmark runs it, not the suite.
@zoo("efficientnet_b0", "sce_probs", in_suite=False)
def efficientnet_b0():
  keras = _seed()
  model = keras.applications.EfficientNetB0(weights=None, input_shape=(32, 32, 3), classes=10)
  _compile(model, _sce(from_logits=False))
  return model, _sample([_normal(32, 32, 3)], [_labels(10)])


# --- our side's losses ----------------------------------------------------------------------


def _keras_sparse_probs(labels, probs):
  """Keras-JAX ``sparse_categorical_crossentropy`` on probabilities (keras/src/backend/jax/nn.py):
  normalise, clip to [eps, 1 - eps], log, pick the label."""
  import jax
  import jax.numpy as jnp

  eps = 1e-7
  probs = probs / jnp.sum(probs, axis=-1, keepdims=True)
  log_prob = jnp.log(jnp.clip(probs, eps, 1.0 - eps))
  onehot = jax.nn.one_hot(labels, probs.shape[-1], dtype=log_prob.dtype)
  return -jnp.sum(onehot * log_prob, axis=-1)


def _losses():
  """Per-sample (or per-step) losses, as Keras's loss functions before their reduction."""
  import jax.numpy as jnp
  import optax

  return {
    "mse": lambda y, p: jnp.mean(jnp.square(p - y), axis=-1),
    "sce_logits": lambda y, p: optax.softmax_cross_entropy_with_integer_labels(
      p, y.reshape(p.shape[:-1])
    ),
    "sce_probs": lambda y, p: _keras_sparse_probs(y.reshape(p.shape[:-1]), p),
    "bce_logits": lambda y, p: jnp.mean(
      optax.sigmoid_binary_cross_entropy(p, y.astype(p.dtype)), axis=-1
    ),
  }


def _reduce(losses, mask):
  """Keras's "sum_over_batch_size" with an output mask (keras/src/losses/loss.py apply_mask):
  the mean over the unmasked entries."""
  import jax.numpy as jnp

  if mask is None:
    return jnp.mean(losses)
  mask = mask.astype(losses.dtype)
  return jnp.sum(losses * mask) / jnp.sum(mask)


# --- the checks -----------------------------------------------------------------------------


@dataclasses.dataclass
class Report:
  """What :func:`check` measured on one zoo model."""

  name: str
  layers: int
  params: int
  convert_s: float
  logit_max_abs: float
  bit_identical: bool
  grad_mode: str
  grad_max_rel: float
  dropped_optimizer: str | None
  roundtrip_weights: bool
  roundtrip_optimizer: bool | None  # None: no optimizer state carried (not Adam)
  roundtrip_iterations: int | None
  keras_iterations: int
  path: str = ""
  inputs: list = dataclasses.field(default_factory=list)
  keras_logits: list = dataclasses.field(default_factory=list)
  our_logits: list = dataclasses.field(default_factory=list)
  timings: dict = dataclasses.field(default_factory=dict)


def _stochastic(config: Any) -> bool:
  """Whether a model config has a layer that draws random numbers in training mode."""
  if isinstance(config, dict):
    if config.get("class_name") in STOCHASTIC:
      return True
    inner = config.get("config")
    if isinstance(inner, dict) and any(
      isinstance(inner.get(k), (int, float)) and inner[k] > 0
      for k in ("dropout", "recurrent_dropout")
    ):
      return True
    return any(_stochastic(v) for v in config.values())
  if isinstance(config, list):
    return any(_stochastic(v) for v in config)
  return False


def _count_layers(config: dict) -> int:
  """Layers of a model config, nested models counted by their layers, inputs not counted."""
  count = 0
  for entry in config["config"]["layers"]:
    if entry["class_name"] in ("Sequential", "Functional", "Model"):
      count += _count_layers(entry)
    elif entry["class_name"] != "InputLayer":
      count += 1
  return count


def _one(xs: list) -> Any:
  """A list of arrays as Keras takes it: the array alone for a single input or output."""
  return xs if len(xs) > 1 else xs[0]


def _flat(x) -> list[np.ndarray]:
  import jax

  return [np.asarray(a) for a in jax.tree.leaves(x)]


def check(name: str, workdir: str | Path, *, seed: int = 0) -> Report:
  """Trains zoo model ``name`` two steps in Keras, converts it and compares (see the module)."""
  import jax
  import keras
  from flax import nnx

  import adamjax.convert as C

  entry = ZOO[name]
  workdir = Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  # Keras broadcasts its biases implicitly: it runs with rank promotion allowed; our module
  # runs under the strict setting the tests set ("raise").
  allow, strict = jax.numpy_rank_promotion("allow"), jax.numpy_rank_promotion("raise")
  clock = [time.perf_counter()]
  timings: dict[str, float] = {}

  def lap(what: str) -> None:
    clock.append(time.perf_counter())
    timings[what] = clock[-1] - clock[-2]

  with allow:
    model, sample = entry.build()
    rng = np.random.default_rng(seed)
    x_train, y_train = sample(rng, 2 * BATCH)
    model.fit(_one(x_train), _one(y_train), batch_size=BATCH, epochs=1, verbose=0, shuffle=False)
    path = workdir / f"{name}.keras"
    lap("fit")
    model.save(path)
  x, y = sample(rng, BATCH)

  start = time.perf_counter()
  ckpt = C.read(path)
  ours = C.flax_model(ckpt)
  convert_s = time.perf_counter() - start
  lap("save+convert")

  # Logits, inference mode, jitted on both sides.
  tv = [v.value for v in model.trainable_variables]
  ntv = [v.value for v in model.non_trainable_variables]
  keras_fwd = jax.jit(lambda tv, ntv, x: model.stateless_call(tv, ntv, x, training=False)[0])
  graphdef, state = nnx.split(ours)
  our_fwd = jax.jit(lambda state, x: nnx.merge(graphdef, state)(*x, training=False))
  with allow:
    expected = _flat(keras_fwd(tv, ntv, _one(x)))
  with strict:
    got = _flat(our_fwd(state, x))
  assert [a.shape for a in got] == [a.shape for a in expected], (name, got, expected)
  logit_diff = max(
    float(np.max(np.abs(a.astype("f8") - b.astype("f8"))))
    for a, b in zip(got, expected, strict=True)
  )
  lap("logits")
  identical = all(np.array_equal(a, b) for a, b in zip(got, expected, strict=True))

  # One-step gradients of the compiled loss (plus regularization) w.r.t. trainable variables.
  training = not _stochastic(ckpt.model_config)
  mv = [v.value for v in model.metrics_variables]
  ov = [v.value for v in model.optimizer.variables]
  kx = _one(x)
  ky = _one(y)

  def keras_loss(tv):
    loss, _ = model.compute_loss_and_updates(tv, ntv, mv, kx, ky, None, training, ov)
    return loss

  with allow:
    keras_grads = [np.asarray(g) for g in jax.jit(jax.grad(keras_loss))(tv)]
  losses = _losses()
  graphdef, params, rest = nnx.split(ours, nnx.Param, ...)

  def our_loss(params):
    # copy=True: fresh variables at this trace level (BatchNormalization writes its moving
    # statistics in training mode, which an outer-level variable refuses under jax.grad).
    m = nnx.merge(graphdef, params, rest, copy=True)
    out, masks, activity = m.run(list(x), None, training=training, rngs=None)
    outs, masks = (out, masks) if isinstance(out, list) else ([out], [masks])
    total = sum(
      _reduce(losses[k](t, o.astype("float32")), mask)
      for k, t, o, mask in zip(entry.loss, y, outs, masks, strict=True)
    )
    return total + sum(m.losses()) + sum(activity)

  with strict:
    our_grads = jax.jit(jax.grad(our_loss))(params)
  lap("grads")
  # Both sides' gradients as Keras layers: ours through from_flax, Keras's written by Keras.
  ours_as_keras = C.from_flax(
    nnx.to_pure_dict(nnx.state(nnx.merge(graphdef, our_grads, rest))), ckpt.layers
  )
  saved = [np.asarray(v.value) for v in model.trainable_variables]
  for v, g in zip(model.trainable_variables, keras_grads, strict=True):
    v.assign(g.astype(v.dtype))
  model.save_weights(workdir / f"{name}.grads.weights.h5")
  for v, s in zip(model.trainable_variables, saved, strict=True):
    v.assign(s)
  keras_as_keras = C.read(
    workdir / f"{name}.grads.weights.h5", model_config=ckpt.model_config
  ).layers
  rel = 0.0
  for a, b, t in zip(ours_as_keras, keras_as_keras, ckpt.layers, strict=True):
    assert a.name == b.name == t.name and list(a.weights) == list(b.weights), (a.name, b.name)
    for var in t.trainable:  # Keras differentiates these; a frozen layer's Params are not
      ga, gb = a.weights[var].astype("f8"), b.weights[var].astype("f8")
      scale = float(np.max(np.abs(gb))) or 1.0
      rel = max(rel, float(np.max(np.abs(ga - gb))) / scale)

  lap("grad-compare")
  # Keras -> JAX -> Keras.
  flax_params = nnx.to_pure_dict(nnx.state(ours, nnx.Param))
  layers = C.from_flax(nnx.to_pure_dict(nnx.state(ours)), ckpt.layers)
  if ckpt.optimizer is not None:
    tx = C.converted_optimizer(ckpt, flax_params)  # Keras's Adam; frozen layers set to zero
    opt_state = C.adam_state(ckpt, tx, flax_params)
    keras_state = C.keras_adam_state(
      opt_state,
      flax_params,
      ckpt.layers,
      class_name=ckpt.optimizer.class_name,
      config=ckpt.optimizer.config,
      learning_rate=ckpt.optimizer.learning_rate,
    )
  else:
    keras_state = None
  back = workdir / f"{name}.back.keras"
  C.write(C.KerasCheckpoint(str(back), layers, keras_state, ckpt.model_config), back)
  with allow, warnings.catch_warnings():
    # Without Adam state the file has no optimizer variables; Keras says so for SGD's.
    warnings.filterwarnings("ignore", "Skipping variable loading for optimizer", UserWarning)
    reloaded = keras.saving.load_model(back)
  same_weights = len(model.weights) == len(reloaded.weights) and all(
    np.array_equal(np.asarray(a), np.asarray(b)) and a.dtype == b.dtype
    for a, b in zip(model.weights, reloaded.weights, strict=True)
  )
  if keras_state is None:
    same_opt, iterations = None, None
  else:
    opt_a, opt_b = model.optimizer.variables, reloaded.optimizer.variables
    same_opt = len(opt_a) == len(opt_b) and all(
      np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(opt_a, opt_b, strict=True)
    )
    iterations = int(reloaded.optimizer.iterations)

  lap("roundtrip")
  return Report(
    name=name,
    layers=_count_layers(ckpt.model_config),
    params=model.count_params(),
    convert_s=convert_s,
    logit_max_abs=logit_diff,
    bit_identical=identical,
    grad_mode="training" if training else "inference",
    grad_max_rel=rel,
    dropped_optimizer=ckpt.dropped_optimizer,
    roundtrip_weights=same_weights,
    roundtrip_optimizer=same_opt,
    roundtrip_iterations=iterations,
    keras_iterations=int(model.optimizer.iterations),
    path=str(path),
    inputs=x,
    keras_logits=expected,
    our_logits=got,
    timings=timings,
  )


def tf_logits(arrays: dict[str, np.ndarray], spec: dict[str, Any]) -> dict[str, np.ndarray]:
  """Subprocess side: each ``spec["models"]`` file loaded by Keras (TensorFlow backend), called
  on its inputs ``{i}_x{j}`` in inference mode; returns its outputs as ``{i}_y{j}``."""
  import keras

  assert keras.backend.backend() == "tensorflow"
  out = {}
  for i, path in enumerate(spec["models"]):
    model = keras.saving.load_model(path)
    xs = [arrays[f"{i}_x{j}"] for j in range(spec["inputs"][i])]
    ys = model(xs if len(xs) > 1 else xs[0], training=False)
    for j, yv in enumerate(ys if isinstance(ys, (list, tuple)) else [ys]):
      out[f"{i}_y{j}"] = np.asarray(yv)
  return out
