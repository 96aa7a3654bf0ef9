"""The Keras (TensorFlow backend) half of the converter's end-to-end test (test_convert_e2e.py).

Usage: KERAS_BACKEND=tensorflow python convert_e2e_worker.py {train,continue,cnn} SPEC.json

``train``: builds the tutorial MLP (tests/keras_models.py), trains ``pre_steps`` steps with
``fit`` (dropout on, as a user would), saves the model in every Keras 3 format at that step, dumps
its variables and its logits on ``x_test``, then trains ``steps`` more steps with dropout off
(``training=False``; a GradientTape step and ``optimizer.apply_gradients``) on the given batches
and records the parameters every ``record_every`` steps.

``continue``: loads a ``.keras`` file the converter wrote (``keras.saving.load_model`` with its
default ``safe_mode``), records its ``iterations`` and variables, and trains ``steps`` steps the
same way.

``cnn``: the same for tests/keras_models.py's small CNN (BatchNorm, a frozen layer), saved as
``.keras`` and as a TF checkpoint.

Arrays travel as ``.npz`` (read with ``allow_pickle=False``). It runs in its own process because
a process holds one Keras backend and the tests use JAX.
"""

import json
import os
import sys

import numpy as np


def _variables(model) -> dict[str, np.ndarray]:
  out = {}
  for layer in model.layers:
    for var in layer.weights:
      out[f"{layer.name}/{var.name}"] = np.asarray(var.numpy())
  opt = model.optimizer
  out["iterations"] = np.asarray(int(opt.iterations.numpy()))
  for var in opt.variables:
    out[f"optimizer/{var.path}"] = np.asarray(var.numpy())
  return out


def _train(model, x, y, steps, record_every):
  """``steps`` Adam steps without dropout; the parameters every ``record_every`` steps."""
  import keras
  import tensorflow as tf

  loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
  variables = model.trainable_variables

  @tf.function
  def step(xb, yb):
    with tf.GradientTape() as tape:
      loss = loss_fn(yb, model(xb, training=False))
    model.optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables, strict=True))
    return loss

  record = {}
  for i in range(steps):
    step(x[32 * i : 32 * (i + 1)], y[32 * i : 32 * (i + 1)])
    if (i + 1) % record_every == 0 or i + 1 == steps:
      for j, v in enumerate(variables):
        record[f"step{i + 1}/{j}"] = np.asarray(v.numpy())
  return record


def _cnn(keras, model, inputs, spec) -> None:
  """The small CNN: 3 ``fit`` steps (BatchNorm in training mode, a frozen Dense), saved as
  ``.keras`` and a TF checkpoint; its variables, its logits, then ``steps`` steps without
  dropout or batch statistics (``training=False``), recorded at the end."""
  import tensorflow as tf

  out = spec["out"]
  model.fit(inputs["x_pre"], inputs["y_pre"], batch_size=32, epochs=1, shuffle=False, verbose=0)
  model.save(os.path.join(out, "cnn.keras"))
  tf.train.Checkpoint(model=model, optimizer=model.optimizer).write(
    os.path.join(out, "cnn_tfckpt", "ckpt")
  )
  np.savez(os.path.join(out, "cnn_saved.npz"), **_variables(model))
  np.savez(
    os.path.join(out, "cnn_logits.npz"), logits=np.asarray(model(inputs["x_test"], training=False))
  )
  record = _train(model, inputs["x_cont"], inputs["y_cont"], spec["steps"], spec["steps"])
  every = {
    f"{layer.name}/{v.name}": np.asarray(v.numpy()) for layer in model.layers for v in layer.weights
  }
  np.savez(os.path.join(out, "cnn_trajectory.npz"), **record, **every)


def main(mode: str, spec_path: str) -> None:
  import keras
  from keras_models import small_cnn, tutorial_mlp

  if keras.backend.backend() != "tensorflow":
    sys.exit("convert_e2e_worker.py needs KERAS_BACKEND=tensorflow")
  with open(spec_path) as f:
    spec = json.load(f)
  out = spec["out"]
  with np.load(spec["inputs"]) as data:
    inputs = {k: data[k] for k in data.files}
  keras.utils.set_random_seed(spec.get("seed", 0))
  if mode == "cnn":
    _cnn(keras, small_cnn(keras), inputs, spec)
    return
  if mode == "train":
    model = tutorial_mlp(keras)
    model.fit(inputs["x_pre"], inputs["y_pre"], batch_size=32, epochs=1, shuffle=False, verbose=0)
    model.save(os.path.join(out, "model.keras"))
    model.save_weights(os.path.join(out, "model.weights.h5"))
    # Keras 3 shards when max_shard_size (in GB) is exceeded: ~0.47 MB per shard here (a shard holds at least one whole variable).
    model.save_weights(os.path.join(out, "sharded.weights.json"), max_shard_size=0.00045)
    import tensorflow as tf

    tf.train.Checkpoint(model=model, optimizer=model.optimizer).write(
      os.path.join(out, "tfckpt", "ckpt")
    )
    np.savez(os.path.join(out, "saved.npz"), **_variables(model))
    logits = model(inputs["x_test"], training=False)
    np.savez(os.path.join(out, "logits.npz"), logits=np.asarray(logits))
  else:
    model = keras.saving.load_model(spec["model"])
    np.savez(os.path.join(out, "loaded.npz"), **_variables(model))
  record = _train(model, inputs["x_cont"], inputs["y_cont"], spec["steps"], spec["record_every"])
  np.savez(os.path.join(out, f"{mode}_trajectory.npz"), **record)


if __name__ == "__main__":
  main(sys.argv[1], sys.argv[2])
