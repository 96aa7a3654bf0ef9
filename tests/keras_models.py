"""The Keras models the converter is tested on, built the same way by every fixture script.

Import this only in a process that has chosen its Keras backend; it imports no Keras itself (each
builder takes the `keras` or `tf_keras` module). The tutorial MLP is `adamjax.testing`'s.
"""

import numpy as np

from adamjax.testing import tutorial_mlp

__all__ = [
  "batches",
  "key",
  "keras3_values",
  "small_cnn",
  "tf_keras_values",
  "train",
  "tutorial_mlp",
]


def small_cnn(keras, *, optimizer="adam"):
  """Conv2D -> BatchNormalization -> MaxPool -> Flatten -> Dense(32, frozen) -> Dense(10).

  Covers HWIO kernels, Keras's padding ("valid") and BatchNorm defaults (epsilon 1e-3, momentum
  0.99; moving statistics are non-trainable), and a frozen layer (no optimizer slots).
  """
  model = keras.Sequential(
    [
      keras.Input((28, 28, 1)),
      keras.layers.Conv2D(8, 3, activation="relu"),
      keras.layers.BatchNormalization(),
      keras.layers.MaxPooling2D(),
      keras.layers.Flatten(),
      keras.layers.Dense(32, activation="relu", trainable=False),
      keras.layers.Dense(10),
    ]
  )
  model.compile(
    optimizer=optimizer,
    loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    metrics=["accuracy"],
  )
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


def key(path: str) -> str:
  """``sequential/dense/kernel`` or ``dense/kernel:0`` -> ``dense/kernel``."""
  return "/".join(path.removesuffix(":0").split("/")[-2:])


def keras3_values(keras, model) -> dict[str, np.ndarray]:
  """A Keras 3 model's weights and optimizer state as Keras holds them: the test oracle."""
  opt = model.optimizer
  out = {f"w/{key(v.path)}": np.asarray(v.numpy()) for v in model.weights}
  for i, v in enumerate(opt.variables):
    out[f"opt/{i}"] = np.asarray(v.numpy())
  if isinstance(opt, keras.optimizers.Adam):  # Other optimizers are fixtures to be refused.
    for var in model.trainable_variables:
      k = opt._get_variable_index(var)  # Keras's own variable -> slot index.
      out[f"m/{key(var.path)}"] = opt._momentums[k].numpy()
      out[f"v/{key(var.path)}"] = opt._velocities[k].numpy()
      if opt.amsgrad:
        out[f"vhat/{key(var.path)}"] = opt._velocity_hats[k].numpy()
  out["iterations"] = np.int64(opt.iterations.numpy())
  schedule = keras.optimizers.schedules.LearningRateSchedule
  if not isinstance(getattr(opt, "_learning_rate", None), schedule):
    out["learning_rate"] = np.float32(opt.learning_rate.numpy())
  out["layers"] = np.array([layer.name for layer in model.layers if layer.weights])
  out["trainable"] = np.array([key(v.path) for v in model.trainable_variables])
  return out


def tf_keras_values(model, legacy: bool) -> dict[str, np.ndarray]:
  """The same for a tf-keras model, whose Adam is the new (``legacy=False``) or the legacy one."""
  opt = model.optimizer
  out = {f"w/{key(v.name)}": np.asarray(v.numpy()) for v in model.weights}
  for var in model.trainable_variables:
    if legacy:
      m, v = opt.get_slot(var, "m"), opt.get_slot(var, "v")
    else:
      k = opt._index_dict[opt._var_key(var)]  # tf-keras's own variable -> slot index.
      m, v = opt._momentums[k], opt._velocities[k]
      if opt.amsgrad:
        out[f"vhat/{key(var.name)}"] = opt._velocity_hats[k].numpy()
    out[f"m/{key(var.name)}"] = m.numpy()
    out[f"v/{key(var.name)}"] = v.numpy()
  out["iterations"] = np.int64(opt.iterations.numpy())
  out["learning_rate"] = np.float32(opt.learning_rate.numpy())
  if legacy:
    out["beta_1"] = np.float32(opt.beta_1)
    out["beta_2"] = np.float32(opt.beta_2)
  out["layers"] = np.array([layer.name for layer in model.layers if layer.weights])
  out["trainable"] = np.array([key(v.name) for v in model.trainable_variables])
  return out
