"""The Keras models the converter is tested on, built the same way by every fixture script.

Import this only in a process that has chosen its Keras backend; it imports nothing itself.
"""

import numpy as np


def tutorial_mlp(keras, *, optimizer="adam"):
    """The Keras tutorial: Flatten -> Dense(128, relu) -> Dropout(0.2) -> Dense(10), compiled."""
    model = keras.Sequential([
        keras.Input((28, 28)),
        keras.layers.Flatten(),
        keras.layers.Dense(128, activation="relu"),
        keras.layers.Dropout(0.2),
        keras.layers.Dense(10),
    ])
    model.compile(optimizer=optimizer,
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    return model


def small_cnn(keras, *, optimizer="adam"):
    """Conv2D -> BatchNormalization -> MaxPool -> Flatten -> Dense(32, frozen) -> Dense(10).

    Covers HWIO kernels, Keras's padding ("valid") and BatchNorm defaults (epsilon 1e-3, momentum
    0.99; moving statistics are non-trainable), and a frozen layer (no optimizer slots).
    """
    model = keras.Sequential([
        keras.Input((28, 28, 1)),
        keras.layers.Conv2D(8, 3, activation="relu"),
        keras.layers.BatchNormalization(),
        keras.layers.MaxPooling2D(),
        keras.layers.Flatten(),
        keras.layers.Dense(32, activation="relu", trainable=False),
        keras.layers.Dense(10),
    ])
    model.compile(optimizer=optimizer,
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    return model


def batches(n_steps, batch_size=32, *, cnn=False, seed=0):
    """Deterministic MNIST-shaped float32 inputs in [0, 1) and int labels, ``n_steps`` batches."""
    rng = np.random.default_rng(seed)
    shape = (n_steps * batch_size, 28, 28) + ((1,) if cnn else ())
    x = rng.random(shape, dtype=np.float32)
    y = rng.integers(0, 10, n_steps * batch_size).astype(np.int32)
    return x, y


def train(model, n_steps, *, cnn=False, seed=0):
    """``n_steps`` Adam steps with ``fit`` (shuffle off), so ``optimizer.iterations == n_steps``."""
    x, y = batches(n_steps, cnn=cnn, seed=seed)
    model.fit(x, y, batch_size=32, epochs=1, shuffle=False, verbose=0)
    return model
