"""Three non-tutorial models and their data for ``python -m train.parity MODEL.keras --data``.

Writes into ``--out`` (default ``workdir/parity_models``), then prints the parity commands that
``benchmarks/results/parity_any_model.md`` reports:

- ``cnn_bn_mnist``: Conv2D -> BatchNorm -> ReLU -> MaxPool -> Conv2D -> BatchNorm -> ReLU ->
  GlobalAveragePooling -> Dropout -> Dense, sparse crossentropy on logits, Adam, on the first
  10,000 real MNIST training images (``train/mnist_data.py``, the verified cache), pixels / 255.
- ``gru_lstm_seq``: Embedding (``mask_zero``) -> GRU (sequences) -> LSTM -> Dense(1, sigmoid),
  binary crossentropy on probabilities, Adam; padded random token sequences (masks matter).
- ``transformer_block``: token and position embeddings -> MultiHeadAttention (causal) -> Add ->
  LayerNorm -> Dense(relu) -> Dense -> Add -> LayerNorm -> pooling -> Dense, categorical
  crossentropy on logits with label smoothing, AdamW, an L2 kernel regularizer, dropout in the
  attention; fitted for 8 steps before saving, so the Adam moments and iteration count carried
  over are not zero.

Models are built with Keras on the JAX backend (this process), seeded, and saved compiled.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "jax")

import numpy as np

if not __package__:
  sys.path[0] = str(Path(__file__).resolve().parents[1])


def cnn_bn_mnist(keras, out: Path) -> None:
  from keras import layers

  from train.mnist_data import load_mnist

  data = load_mnist(verbose=False)
  n = 10_000
  x = (data.train_images[:n] / 255.0).astype(np.float32)[..., None]
  np.savez(out / "cnn_bn_mnist.npz", x=x, y=data.train_labels[:n].astype(np.int32))
  keras.utils.set_random_seed(0)
  model = keras.Sequential(
    [
      keras.Input((28, 28, 1)),
      layers.Conv2D(16, 3, use_bias=False),
      layers.BatchNormalization(),
      layers.ReLU(),
      layers.MaxPooling2D(),
      layers.Conv2D(32, 3, use_bias=False),
      layers.BatchNormalization(),
      layers.ReLU(),
      layers.GlobalAveragePooling2D(),
      layers.Dropout(0.2),
      layers.Dense(10),
    ]
  )
  model.compile(
    optimizer=keras.optimizers.Adam(1e-3),
    loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
  )
  model.save(out / "cnn_bn_mnist.keras")


def gru_lstm_seq(keras, out: Path) -> None:
  from keras import layers

  rng = np.random.default_rng(1)
  n, length, vocab = 4096, 20, 50
  tokens = rng.integers(1, vocab, (n, length))
  lengths = rng.integers(5, length + 1, n)
  tokens[np.arange(length)[None, :] >= lengths[:, None]] = 0  # Padding, masked by mask_zero.
  y = ((tokens == 7).sum(1) > (tokens == 9).sum(1)).astype(np.float32)[:, None]
  np.savez(out / "gru_lstm_seq.npz", x=tokens.astype(np.int32), y=y)
  keras.utils.set_random_seed(1)
  model = keras.Sequential(
    [
      keras.Input((length,), dtype="int32"),
      layers.Embedding(vocab, 16, mask_zero=True),
      layers.GRU(32, return_sequences=True),
      layers.LSTM(16),
      layers.Dense(1, activation="sigmoid"),
    ]
  )
  model.compile(optimizer=keras.optimizers.Adam(2e-3), loss="binary_crossentropy")
  model.save(out / "gru_lstm_seq.keras")


def transformer_block(keras, out: Path) -> None:
  from keras import layers

  rng = np.random.default_rng(2)
  n, length, vocab, classes, dim = 2048, 16, 64, 4, 32
  tokens = rng.integers(0, vocab, (n, length)).astype(np.int32)
  positions = np.broadcast_to(np.arange(length, dtype=np.int32), (n, length))
  labels = (tokens[:, :4].sum(1) % classes).astype(np.int64)
  y = np.eye(classes, dtype=np.float32)[labels]
  np.savez(out / "transformer_block.npz", x0=tokens, x1=positions.copy(), y=y)
  keras.utils.set_random_seed(2)
  tok = keras.Input((length,), dtype="int32", name="tokens")
  pos = keras.Input((length,), dtype="int32", name="positions")
  h = layers.Add()([layers.Embedding(vocab, dim)(tok), layers.Embedding(length, dim)(pos)])
  a = layers.MultiHeadAttention(4, dim // 4, dropout=0.1)(h, h, use_causal_mask=True)
  h = layers.LayerNormalization()(layers.Add()([h, a]))
  l2 = keras.regularizers.L2(1e-4)
  f = layers.Dense(2 * dim, activation="relu", kernel_regularizer=l2)(h)
  f = layers.Dense(dim, kernel_regularizer=l2)(f)
  h = layers.LayerNormalization()(layers.Add()([h, f]))
  logits = layers.Dense(classes)(layers.GlobalAveragePooling1D()(h))
  model = keras.Model([tok, pos], logits)
  model.compile(
    optimizer=keras.optimizers.AdamW(1e-3, weight_decay=1e-2),
    loss=keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=0.1),
  )
  # A few steps first: the file then carries nonzero Adam moments and iterations = 8.
  model.fit([tokens[:256], positions[:256]], y[:256], batch_size=32, epochs=1, verbose=0)
  model.save(out / "transformer_block.keras")


MODELS = {"cnn_bn_mnist": cnn_bn_mnist, "gru_lstm_seq": gru_lstm_seq}
MODELS["transformer_block"] = transformer_block


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", default="workdir/parity_models")
  parser.add_argument("--steps", type=int, default=1000)
  args = parser.parse_args(argv)
  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  import jax
  import keras

  with jax.numpy_rank_promotion("allow"):
    for build in MODELS.values():
      build(keras, out)
  for name in MODELS:
    print(
      f"python -m train.parity {out / name}.keras --data {out / name}.npz "
      f"--steps {args.steps} --record-every 10 --noise-floor"
      + (" --keras-dense-gradients" if name != "cnn_bn_mnist" else "")
      + f" --workdir {out / name}_run"
    )
  return 0


if __name__ == "__main__":
  sys.exit(main())
