"""The Keras tutorial's MNIST model, built one way for tests, benchmarks and the parity check."""

from __future__ import annotations

from typing import Any

# Keras's own names for these layers in a fresh session, given explicitly so that every model
# built in one process has them (the converter maps layers onto Flax modules by name).
TUTORIAL_LAYER_NAMES = ("flatten", "dense", "dropout", "dense_1")


def tutorial_mlp(
  keras: Any,
  *,
  optimizer: Any = "adam",
  hidden: int = 128,
  dropout_rate: float = 0.2,
) -> Any:
  """The TensorFlow quickstart model, compiled: Flatten, Dense(128, relu), Dropout(0.2), Dense(10).

  `keras.Sequential([Input((28, 28)), Flatten, Dense(hidden, relu), Dropout(dropout_rate),
  Dense(10)])` with the layers named as in :data:`TUTORIAL_LAYER_NAMES`, Keras's default
  initialisers (glorot-uniform kernels, zero biases: seed them with
  `keras.utils.set_random_seed`), compiled with sparse softmax cross-entropy on logits and an
  accuracy metric.

  Args:
    keras: the Keras module to build with (`keras` on any backend, or `tf_keras`); the caller
      imports it, so the backend is the caller's choice.
    optimizer: anything `model.compile` accepts (`"adam"`, `keras.optimizers.Adam(1e-3)`, ...).
    hidden: width of the hidden layer.
    dropout_rate: the Dropout layer's rate.
  """
  flatten, dense, dropout, dense_1 = TUTORIAL_LAYER_NAMES
  model = keras.Sequential(
    [
      keras.Input((28, 28)),
      keras.layers.Flatten(name=flatten),
      keras.layers.Dense(hidden, activation="relu", name=dense),
      keras.layers.Dropout(dropout_rate, name=dropout),
      keras.layers.Dense(10, name=dense_1),
    ]
  )
  model.compile(
    optimizer=optimizer,
    loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    metrics=["accuracy"],
  )
  return model
