"""One small Keras model per family of registered layers, built the same way on any backend.

:func:`compare_layer_cases` builds every case on the TensorFlow backend (in a subprocess, with
:func:`build_on_backend`), converts each saved ``.keras`` with ``adamjax.convert.flax_model`` and
compares its jitted logits with Keras-TF's ``predict`` and Keras-JAX's. Weights are random
(seeded), inputs too, so nothing is compared on zeros. ``tests/test_convert_layers_tf.py``
asserts the bounds; ``python -m benchmarks.convert_layers`` prints the table.
"""

from __future__ import annotations

import pathlib
from typing import Any

import numpy as np


def _seq(keras, shape, *layers, dtype="float32"):
  x = keras.Input(shape, dtype=dtype)
  y = x
  for layer in layers:
    y = layer(y)
  return keras.Model(x, y)


def _two(keras, shape, layer):
  a, b = keras.Input(shape), keras.Input(shape)
  return keras.Model([a, b], layer([a, b]))


def cases(keras) -> dict[str, Any]:
  """Case name -> a function building the model (one Keras built-in layer, a few options)."""
  L = keras.layers  # noqa: N806
  rnn_in = (6, 5)
  return {
    "Dense": lambda: _seq(keras, (7,), L.Dense(5, activation="gelu")),
    "EinsumDense": lambda: _seq(
      keras, (4, 6), L.EinsumDense("abc,cd->abd", output_shape=(None, 3), bias_axes="d")
    ),
    "Embedding": lambda: _seq(keras, (5,), L.Embedding(11, 4), dtype="int32"),
    "Conv1D-causal": lambda: _seq(keras, (9, 3), L.Conv1D(4, 3, padding="causal", dilation_rate=2)),
    "Conv2D-same-strided": lambda: _seq(
      keras, (9, 9, 3), L.Conv2D(4, 3, strides=2, padding="same")
    ),
    "Conv2D-channels_first": lambda: _seq(
      keras, (3, 8, 8), L.Conv2D(4, 3, data_format="channels_first")
    ),
    "Conv3D": lambda: _seq(keras, (5, 5, 5, 2), L.Conv3D(3, 2)),
    "Conv2D-groups": lambda: _seq(keras, (8, 8, 4), L.Conv2D(6, 3, groups=2)),
    "Conv1DTranspose": lambda: _seq(keras, (7, 3), L.Conv1DTranspose(2, 3, strides=2)),
    "Conv2DTranspose": lambda: _seq(
      keras, (6, 6, 3), L.Conv2DTranspose(2, 3, strides=2, padding="same")
    ),
    "Conv3DTranspose": lambda: _seq(keras, (4, 4, 4, 2), L.Conv3DTranspose(2, 2)),
    "DepthwiseConv1D": lambda: _seq(keras, (9, 3), L.DepthwiseConv1D(3, depth_multiplier=2)),
    "DepthwiseConv2D": lambda: _seq(keras, (8, 8, 3), L.DepthwiseConv2D(3, padding="same")),
    "SeparableConv1D": lambda: _seq(keras, (9, 3), L.SeparableConv1D(4, 3)),
    "SeparableConv2D": lambda: _seq(keras, (8, 8, 3), L.SeparableConv2D(4, 3, strides=2)),
    "BatchNormalization": lambda: _seq(keras, (6, 4), L.BatchNormalization(momentum=0.9)),
    "LayerNormalization": lambda: _seq(keras, (6, 4), L.LayerNormalization()),
    "GroupNormalization": lambda: _seq(keras, (6, 4), L.GroupNormalization(2)),
    "UnitNormalization": lambda: _seq(keras, (6, 4), L.UnitNormalization()),
    "Dropout-family": lambda: _seq(
      keras,
      (6, 4),
      L.Dropout(0.3),
      L.SpatialDropout1D(0.2),
      L.GaussianNoise(0.1),
      L.GaussianDropout(0.1),
      L.AlphaDropout(0.1),
      L.ActivityRegularization(l2=0.1),
    ),
    "Reshaping": lambda: _seq(
      keras,
      (4, 6),
      L.Reshape((6, 4)),
      L.Permute((2, 1)),
      L.Flatten(),
      L.RepeatVector(2),
      L.Masking(0.5),
      L.Identity(),
    ),
    "Padding-cropping-upsampling-2D": lambda: _seq(
      keras,
      (6, 6, 2),
      L.ZeroPadding2D(1),
      L.Cropping2D(((1, 0), (0, 2))),
      L.UpSampling2D(2, interpolation="bilinear"),
    ),
    "Padding-cropping-upsampling-1D-3D": lambda: _seq(
      keras,
      (4, 4, 4, 2),
      L.ZeroPadding3D(1),
      L.Cropping3D(1),
      L.UpSampling3D(2),
      L.Reshape((-1, 2)),
      L.ZeroPadding1D(2),
      L.Cropping1D((1, 2)),
      L.UpSampling1D(2),
    ),
    "Pooling-2D": lambda: _seq(
      keras,
      (8, 8, 3),
      L.MaxPooling2D(2),
      L.AveragePooling2D(2, strides=1, padding="same"),
      L.GlobalAveragePooling2D(keepdims=True),
      L.GlobalMaxPooling2D(),
    ),
    "Pooling-1D-3D": lambda: _seq(
      keras,
      (6, 6, 6, 2),
      L.MaxPooling3D(2),
      L.AveragePooling3D(1),
      L.Reshape((27, 2)),
      L.MaxPooling1D(2),
      L.AveragePooling1D(2, padding="same"),
      L.GlobalMaxPooling1D(keepdims=True),
      L.GlobalAveragePooling1D(),
    ),
    "GlobalPooling-3D": lambda: _seq(
      keras,
      (4, 4, 4, 2),
      L.SpatialDropout3D(0.2),
      L.GlobalAveragePooling3D(keepdims=True),
      L.GlobalMaxPooling3D(),
    ),
    "SpatialDropout2D": lambda: _seq(keras, (4, 4, 2), L.SpatialDropout2D(0.2), L.Flatten()),
    "Masked-merge": lambda: _masked_merge(keras),
    "SimpleRNN": lambda: _seq(keras, rnn_in, L.SimpleRNN(4, return_sequences=True)),
    "LSTM-backwards": lambda: _seq(keras, rnn_in, L.LSTM(4, go_backwards=True)),
    "GRU-reset_after": lambda: _seq(keras, rnn_in, L.GRU(4)),
    "GRU-reset_before": lambda: _seq(keras, rnn_in, L.GRU(4, reset_after=False)),
    "Bidirectional": lambda: _seq(
      keras, rnn_in, L.Bidirectional(L.LSTM(3, return_sequences=True), merge_mode="sum")
    ),
    "Masked-LSTM": lambda: _seq(
      keras, (6,), L.Embedding(9, 4, mask_zero=True), L.LSTM(3), dtype="int32"
    ),
    "MultiHeadAttention": lambda: _mha(keras),
    "Attention": lambda: _two(keras, (5, 4), L.Attention(use_scale=True)),
    "AdditiveAttention": lambda: _two(keras, (5, 4), L.AdditiveAttention()),
    "Merging": lambda: _merging(keras),
    "Dot": lambda: _two(keras, (5,), L.Dot(axes=1, normalize=True)),
    "Activations": lambda: _seq(
      keras,
      (8,),
      L.Activation("swish"),
      L.ReLU(max_value=6.0),
      L.LeakyReLU(0.2),
      L.PReLU(),
      L.ELU(),
      L.Dense(8, activation="selu"),
      L.Dense(8, activation="hard_sigmoid"),
      L.Dense(8, activation="mish"),
      L.Softmax(),
    ),
    "Rescaling-Normalization": lambda: _seq(
      keras,
      (5,),
      L.Rescaling(0.5, offset=-1.0),
      L.Normalization(mean=[0.1, 0.2, 0.3, 0.4, 0.5], variance=[1.0, 2.0, 3.0, 4.0, 5.0]),
    ),
  }


def _mha(keras):
  x = keras.Input((5, 6))
  return keras.Model(x, keras.layers.MultiHeadAttention(2, 3)(x, x, use_causal_mask=True))


def _masked_merge(keras):
  L = keras.layers  # noqa: N806
  a, b = keras.Input((5, 3)), keras.Input((5, 3))
  ma, mb = L.Masking()(a), L.Masking()(b)
  joined = L.Concatenate()([ma, mb])
  return keras.Model([a, b], [L.GlobalAveragePooling1D()(joined), L.GRU(2)(L.Multiply()([ma, mb]))])


def _merging(keras):
  L = keras.layers  # noqa: N806
  a, b = keras.Input((4,)), keras.Input((4,))
  outs = [
    merge()([a, b]) for merge in (L.Add, L.Subtract, L.Multiply, L.Average, L.Maximum, L.Minimum)
  ]
  return keras.Model([a, b], L.Concatenate()(outs))


def inputs_for(model, seed: int) -> list[np.ndarray]:
  """Random inputs for a built model (integers below 9 for integer inputs)."""
  rng = np.random.default_rng(seed)
  out = []
  for tensor in model.inputs:
    shape = (3, *tensor.shape[1:])
    if "int" in str(tensor.dtype):
      out.append(rng.integers(0, 9, size=shape).astype(np.int32))
    else:
      out.append(rng.normal(size=shape).astype(np.float32))
  return out


def build_on_backend(arrays: dict[str, np.ndarray], spec: dict[str, Any]) -> dict[str, np.ndarray]:
  """Builds every case (random weights), saves ``<out>/<case>.keras`` and returns, per case,
  its inputs (``<case>/in<i>``) and Keras's inference outputs (``<case>/out<i>``)."""
  del arrays
  import keras

  out_dir = pathlib.Path(spec["out"])
  result = {}
  for i, (name, build) in enumerate(sorted(cases(keras).items())):
    keras.utils.set_random_seed(i)
    model = build()
    rng = np.random.default_rng(i)
    for w in model.weights:
      if "int" not in str(w.dtype) and w.shape != ():
        value = rng.normal(size=w.shape) * 0.5
        if "variance" in w.path:
          value = np.abs(value) + 0.5
        w.assign(value.astype(w.dtype))
    model.save(out_dir / f"{name}.keras")
    inputs = inputs_for(model, i)
    outputs = model.predict(inputs if len(inputs) > 1 else inputs[0], verbose=0)
    outputs = outputs if isinstance(outputs, list) else [outputs]
    result.update({f"{name}/in{j}": x for j, x in enumerate(inputs)})
    result.update({f"{name}/out{j}": np.asarray(y) for j, y in enumerate(outputs)})
  return result


def compare_layer_cases(folder: str | pathlib.Path) -> list[dict[str, Any]]:
  """Per case: max |ours - Keras-TF| and |ours - Keras-JAX| (scaled by max(1, max |Keras|)),
  and whether ours equals Keras-JAX bit for bit. Needs Keras on the JAX backend in this process.
  """
  import jax
  import keras
  from flax import nnx

  from adamjax import convert
  from adamjax.testing._keras_subprocess import call_in_keras_backend

  folder = pathlib.Path(folder)
  tf = call_in_keras_backend("tensorflow", __file__, "build_on_backend", {}, {"out": str(folder)})
  rows = []
  for name in sorted(cases(keras)):
    inputs = [
      tf[f"{name}/in{j}"] for j in range(len([k for k in tf if k.startswith(f"{name}/in")]))
    ]
    expected_tf = [
      tf[f"{name}/out{j}"] for j in range(len([k for k in tf if k.startswith(f"{name}/out")]))
    ]
    path = folder / f"{name}.keras"
    model = convert.flax_model(path)
    graphdef, state = nnx.split(model)
    ours = jax.jit(lambda state, *x, g=graphdef: nnx.merge(g, state)(*x))(state, *inputs)
    ours = [np.asarray(o) for o in (ours if isinstance(ours, list) else [ours])]
    with jax.numpy_rank_promotion("allow"):
      keras_model = keras.saving.load_model(path)
      jax_out = keras_model.predict(inputs if len(inputs) > 1 else inputs[0], verbose=0)
    jax_out = [np.asarray(o) for o in (jax_out if isinstance(jax_out, list) else [jax_out])]

    def scaled(reference, ours=ours):
      return max(
        float(np.max(np.abs(o - r))) / max(1.0, float(np.max(np.abs(r))))
        for o, r in zip(ours, reference, strict=True)
      )

    rows.append(
      {
        "case": name,
        "classes": sorted(
          {type(layer).__name__ for layer in keras_model._flatten_layers()}
          - {"Functional", "InputLayer"}
        ),
        "vs_tf": scaled(expected_tf),
        "vs_jax": scaled(jax_out),
        "bit_identical_jax": all(np.array_equal(o, r) for o, r in zip(ours, jax_out, strict=True)),
      }
    )
  return rows
