"""Write the TensorFlow-format checkpoints the converter tests read, and TensorFlow's values.

Usage: KERAS_BACKEND=tensorflow python fixtures_tf.py OUT_DIR

Runs in its own process (a process holds one Keras backend, and the tests use JAX without
TensorFlow). Each model is trained for 3 ``fit`` steps, then saved in every format listed for it.
Beside the checkpoints it writes two kinds of reference, both plain ``.npz`` (no pickles):

``<stem>.npz``: Keras's values read from the live objects (never from the files), as in
``fixtures_keras.py``:

- ``w/<layer>/<var>``: every model variable, named by Keras (``dense/kernel``);
- ``m/<layer>/<var>``, ``v/...``, ``vhat/...``: Adam's slots, paired with their variable by the
  optimizer's own index (Keras 3, tf-keras) or ``get_slot`` (tf-keras legacy), not by position;
- ``iterations`` (int64), ``learning_rate`` (float32); ``beta_1``/``beta_2`` (legacy Adam);
- ``layers``, ``trainable``: the variable-owning layer names in model order, and the
  ``layer/var`` keys of ``model.trainable_variables`` in order.

``dumps/<bundle>.npz``: ``tf.train.load_checkpoint`` of every TensorBundle written (every key,
``keys``/``dtypes`` and ``t<i>``; a string tensor as ``t<i>`` = its concatenated bytes, ``l<i>``
= their lengths, ``s<i>`` = its shape). ``manifest.json`` maps each bundle name to its prefix.

Fixtures (``<stem>.<format>``; Keras 3 on the TensorFlow backend unless named ``tfk_``):

- ``mlp``, ``cnn``: ``ckpt`` (``tf.train.Checkpoint(model=, optimizer=)``; ``mlp`` through
  ``save``, ``cnn`` through a ``CheckpointManager`` that also saved the untrained model first),
  ``sharded`` (``write`` with ``MaxShardSizePolicy`` small enough to shard and slice),
  ``export`` (``model.export``), ``savedmodel`` (``tf.saved_model.save``), ``orbax``
  (``keras.callbacks.OrbaxCheckpoint``);
- ``mlp_amsgrad``: ``ckpt``, ``orbax``;
- ``mlp_lossscale`` (``LossScaleOptimizer``), ``mlp_rmsprop`` (``RMSprop(momentum=0.9)``):
  ``ckpt``, to be refused;
- ``tfk_mlp``, ``tfk_cnn`` (tf-keras new Adam), ``tfk_mlp_legacy``, ``tfk_cnn_legacy``
  (``optimizers.legacy.Adam``), ``tfk_mlp_decay`` (legacy Adam with ``decay=1e-3``, to be
  refused), ``tfk_twins`` (:func:`twin_dense`, new Adam): ``ckpt`` via
  ``tf.train.Checkpoint(model=, optimizer=).write``; ``tfk_cnn`` also ``savedmodel``
  (tf-keras's ``model.save(directory, save_format="tf")``).
"""

import json
import os
import pathlib
import sys

import keras_models
import numpy as np

STEPS = 3
# Shards of at most 40 kB: the MLP's 784x128 kernel (401 kB) and the CNN's 1352x32 kernel
# (173 kB) are split into slices across several data files.
MAX_SHARD_BYTES = 40_000

_manifest: dict[str, str] = {}


def _dump_bundle(tf, out: pathlib.Path, name: str, prefix: pathlib.Path) -> None:
  """TensorFlow's own reading of a bundle: the oracle for the reader's conformance test."""
  reader = tf.train.load_checkpoint(str(prefix))
  dtypes = reader.get_variable_to_dtype_map()
  keys = sorted(dtypes)
  arrays = {"keys": np.array(keys), "dtypes": np.array([dtypes[k].name for k in keys])}
  for i, key in enumerate(keys):
    value = reader.get_tensor(key)
    if dtypes[key] == tf.string:
      items = np.asarray(value, dtype=object).reshape(-1).tolist()
      arrays[f"t{i}"] = np.frombuffer(b"".join(items), dtype=np.uint8)
      arrays[f"l{i}"] = np.array([len(b) for b in items], dtype=np.int64)
      arrays[f"s{i}"] = np.array(np.shape(value), dtype=np.int64)
    else:
      arrays[f"t{i}"] = np.asarray(value)
  (out / "dumps").mkdir(exist_ok=True)
  np.savez(out / "dumps" / f"{name}.npz", **arrays)
  _manifest[name] = str(prefix.relative_to(out))


def keras3(tf, out: pathlib.Path) -> None:
  import keras

  assert keras.backend.backend() == "tensorflow", keras.backend.backend()
  mlp, cnn = keras_models.tutorial_mlp, keras_models.small_cnn
  all_formats = ("ckpt", "sharded", "export", "savedmodel", "orbax")
  specs = {
    "mlp": (mlp, lambda: "adam", all_formats),
    "cnn": (cnn, lambda: "adam", all_formats),
    "mlp_amsgrad": (mlp, lambda: keras.optimizers.Adam(amsgrad=True), ("ckpt", "orbax")),
    "mlp_lossscale": (
      mlp,
      lambda: keras.optimizers.LossScaleOptimizer(keras.optimizers.Adam()),
      ("ckpt",),
    ),
    "mlp_rmsprop": (mlp, lambda: keras.optimizers.RMSprop(momentum=0.9), ("ckpt",)),
  }
  for stem, (build, optimizer, formats) in specs.items():
    # A fresh name scope per model, so Keras names its layers dense, dense_1, ... again.
    keras.backend.clear_session()
    model = build(keras, optimizer=optimizer())
    checkpoint = tf.train.Checkpoint(model=model, optimizer=model.optimizer)
    manager = None
    if stem == "cnn":
      # Saved once before training, so the reader must follow the `checkpoint` file to
      # the latest save rather than take any prefix it finds.
      manager = tf.train.CheckpointManager(checkpoint, out / f"{stem}.ckpt", max_to_keep=3)
      manager.save()
    callbacks = []
    if "orbax" in formats:
      callbacks.append(
        keras.callbacks.OrbaxCheckpoint(str(out / f"{stem}.orbax"), save_on_background=False)
      )
    cnn_input = build is cnn
    x, y = keras_models.batches(STEPS, cnn=cnn_input)
    # keras_models.train's fit, plus the callback.
    model.fit(x, y, batch_size=32, epochs=1, shuffle=False, verbose=0, callbacks=callbacks)
    if "ckpt" in formats:
      if manager is not None:
        path = pathlib.Path(manager.save())
      else:
        path = pathlib.Path(checkpoint.save(str(out / f"{stem}.ckpt" / "ckpt")))
      _dump_bundle(tf, out, f"{stem}.ckpt", path)
    if "sharded" in formats:
      options = tf.train.CheckpointOptions(
        experimental_sharding_callback=tf.train.experimental.MaxShardSizePolicy(
          max_shard_size=MAX_SHARD_BYTES
        )
      )
      path = pathlib.Path(checkpoint.write(str(out / f"{stem}.sharded" / "ckpt"), options=options))
      _dump_bundle(tf, out, f"{stem}.sharded", path)
    if "export" in formats:
      model.export(str(out / f"{stem}.export"), verbose=False)
      _dump_bundle(tf, out, f"{stem}.export", out / f"{stem}.export" / "variables" / "variables")
    if "savedmodel" in formats:
      tf.saved_model.save(model, str(out / f"{stem}.savedmodel"))
      _dump_bundle(
        tf, out, f"{stem}.savedmodel", out / f"{stem}.savedmodel" / "variables" / "variables"
      )
    np.savez(out / f"{stem}.npz", **keras_models.keras3_values(keras, model))


def twin_dense(keras, *, optimizer):
  """Same-shaped Dense layers, the first frozen: only tf-keras's slot names tell which."""
  model = keras.Sequential(
    [
      keras.Input((28, 28)),
      keras.layers.Flatten(),
      keras.layers.Dense(16, activation="relu"),
      keras.layers.Dense(16, activation="relu", trainable=False),
      keras.layers.Dense(16, activation="relu"),
      keras.layers.Dense(10),
    ]
  )
  model.compile(
    optimizer=optimizer, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True)
  )
  return model


def tf_keras(tf, out: pathlib.Path) -> None:
  import tf_keras

  mlp, cnn = keras_models.tutorial_mlp, keras_models.small_cnn
  specs = {
    "tfk_mlp": (mlp, tf_keras.optimizers.Adam, False),
    "tfk_cnn": (cnn, tf_keras.optimizers.Adam, False),
    "tfk_mlp_legacy": (mlp, tf_keras.optimizers.legacy.Adam, True),
    "tfk_cnn_legacy": (cnn, tf_keras.optimizers.legacy.Adam, True),
    "tfk_mlp_decay": (mlp, lambda: tf_keras.optimizers.legacy.Adam(decay=1e-3), True),
    "tfk_twins": (twin_dense, tf_keras.optimizers.Adam, False),
  }
  for stem, (build, optimizer, legacy) in specs.items():
    tf_keras.backend.clear_session()
    model = build(tf_keras, optimizer=optimizer())
    keras_models.train(model, STEPS, cnn=build is cnn)
    checkpoint = tf.train.Checkpoint(model=model, optimizer=model.optimizer)
    path = pathlib.Path(checkpoint.write(str(out / f"{stem}.ckpt" / "ckpt")))
    _dump_bundle(tf, out, f"{stem}.ckpt", path)
    if stem == "tfk_cnn":  # tf-keras's own SavedModel format (model.save to a directory).
      model.save(str(out / f"{stem}.savedmodel"), save_format="tf")
      _dump_bundle(
        tf, out, f"{stem}.savedmodel", out / f"{stem}.savedmodel" / "variables" / "variables"
      )
    np.savez(out / f"{stem}.npz", **keras_models.tf_keras_values(model, legacy))


def main(out_dir: str) -> None:
  import tensorflow as tf

  out = pathlib.Path(out_dir).absolute()  # Orbax needs absolute paths.
  out.mkdir(parents=True, exist_ok=True)
  keras3(tf, out)
  tf_keras(tf, out)
  (out / "manifest.json").write_text(json.dumps(_manifest, indent=1))


if __name__ == "__main__":
  if len(sys.argv) != 2 or os.environ.get("KERAS_BACKEND") != "tensorflow":
    sys.exit(__doc__)
  main(sys.argv[1])
