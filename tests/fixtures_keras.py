"""Write the Keras checkpoints the converter tests read, with Keras's own values beside each.

Usage: KERAS_BACKEND=tensorflow python fixtures_keras.py build OUT_DIR
       KERAS_BACKEND=tensorflow python fixtures_keras.py load MODEL.keras OUT.npz

Runs in its own process: a process holds one Keras backend, and the tests use JAX.

``build`` trains each fixture model 3 ``fit`` steps and writes its checkpoint files plus
``<stem>.npz``, Keras's values read from the live objects (never from the files):

- ``w/<layer>/<var>``: every model variable, named by Keras (``dense/kernel``);
- ``m/<layer>/<var>``, ``v/...``, ``vhat/...``: Adam's slots, paired with their variable by
  object identity (the optimizer's own index), not by position in a file;
- ``opt/<i>``: every optimizer variable in ``optimizer.variables`` order (Keras 3 only);
- ``iterations`` (int64), ``learning_rate`` (float32; absent under a schedule);
- ``layers`` and ``trainable``: the variable-owning layer names in model order and the
  ``layer/var`` keys of ``model.trainable_variables`` in order.

Fixtures (Keras 3 on the TensorFlow backend unless named ``tfk_``):

- ``mlp``, ``cnn``: ``.keras``, ``.weights.h5``, sharded ``.weights.json`` (several shards);
- ``mlp_amsgrad``, ``mlp_schedule`` (ExponentialDecay), ``mlp_adamw``, ``mlp_ema``,
  ``mlp_accum`` (``gradient_accumulation_steps=2``): ``.keras``; ``mlp_schedule`` also
  ``.weights.h5``;
- ``functional``: a Functional CNN with user layer names, a nested Sequential and a frozen
  Dense (:func:`functional_cnn`): ``.keras`` and ``.weights.h5``;
- ``tfk_mlp``, ``tfk_cnn``, ``tfk_mlp_amsgrad`` (tf-keras's default Adam), ``tfk_mlp_legacy``
  (``optimizers.legacy.Adam``): full-model ``.h5`` from tf-keras 2.

``manifest.json`` (the files written) comes last.

``load`` restores a ``.keras`` file (one the converter wrote) with ``keras.saving.load_model``
on the TensorFlow backend, dumps what Keras restored (the same keys), then trains one more
step and records ``iterations_after_fit``.
"""

import json
import os
import pathlib
import sys

import keras_models
import numpy as np

STEPS = 3


def functional_cnn(keras, *, optimizer="adam"):
  """Names that differ from the class-based h5 groups (``conv`` is ``conv2d``), an InputLayer
  that a Functional model lists, a nested Sequential and a frozen layer."""
  inputs = keras.Input((28, 28, 1), name="img")
  x = keras.layers.Conv2D(8, 3, activation="relu", name="conv")(inputs)
  x = keras.layers.BatchNormalization(name="bn")(x)
  x = keras.Sequential(
    [keras.layers.Conv2D(4, 3, name="inner_conv"), keras.layers.ReLU()], name="block"
  )(x)
  x = keras.layers.MaxPooling2D()(x)
  x = keras.layers.Flatten()(x)
  x = keras.layers.Dense(16, activation="relu", trainable=False, name="frozen_dense")(x)
  outputs = keras.layers.Dense(10, name="head")(x)
  model = keras.Model(inputs, outputs, name="cnn")
  model.compile(
    optimizer=optimizer,
    loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    metrics=["accuracy"],
  )
  return model


def keras3(out: pathlib.Path) -> None:
  import keras

  assert keras.backend.backend() == "tensorflow", keras.backend.backend()
  schedule = keras.optimizers.schedules.ExponentialDecay(1e-3, decay_steps=2, decay_rate=0.5)
  specs = {
    "mlp": (keras_models.tutorial_mlp, "adam", ("keras", "weights.h5", "weights.json")),
    "cnn": (keras_models.small_cnn, "adam", ("keras", "weights.h5", "weights.json")),
    "mlp_amsgrad": (keras_models.tutorial_mlp, keras.optimizers.Adam(amsgrad=True), ("keras",)),
    "mlp_schedule": (
      keras_models.tutorial_mlp,
      keras.optimizers.Adam(schedule),
      ("keras", "weights.h5"),
    ),
    "mlp_adamw": (keras_models.tutorial_mlp, "adamw", ("keras",)),
    "mlp_ema": (keras_models.tutorial_mlp, keras.optimizers.Adam(use_ema=True), ("keras",)),
    "mlp_accum": (
      keras_models.tutorial_mlp,
      keras.optimizers.Adam(gradient_accumulation_steps=2),
      ("keras",),
    ),
    "functional": (functional_cnn, "adam", ("keras", "weights.h5")),
  }
  for stem, (build, optimizer, formats) in specs.items():
    # A fresh name scope per model, so Keras names its layers dense, dense_1, ... again.
    keras.backend.clear_session()
    model = build(keras, optimizer=optimizer)
    keras_models.train(model, STEPS, cnn=build is not keras_models.tutorial_mlp)
    for fmt in formats:
      if fmt == "weights.json":
        # Shards (in GB) just above the largest variable, so both the layer groups and
        # /optimizer/vars span several files.
        largest = max(v.numpy().nbytes for v in model.weights)
        model.save_weights(out / f"{stem}.weights.json", max_shard_size=1.001 * largest / 2**30)
      elif fmt == "weights.h5":
        model.save_weights(out / f"{stem}.weights.h5")
      else:
        model.save(out / f"{stem}.keras")
    np.savez(out / f"{stem}.npz", **keras_models.keras3_values(keras, model))


def tf_keras(out: pathlib.Path) -> None:
  import tf_keras

  specs = {
    "tfk_mlp": (keras_models.tutorial_mlp, False),
    "tfk_cnn": (keras_models.small_cnn, False),
    "tfk_mlp_amsgrad": (keras_models.tutorial_mlp, False),
    "tfk_mlp_legacy": (keras_models.tutorial_mlp, True),
  }
  for stem, (build, legacy) in specs.items():
    tf_keras.backend.clear_session()
    amsgrad = stem.endswith("amsgrad")
    optimizer = (
      tf_keras.optimizers.legacy.Adam() if legacy else tf_keras.optimizers.Adam(amsgrad=amsgrad)
    )
    model = build(tf_keras, optimizer=optimizer)
    keras_models.train(model, STEPS, cnn=build is keras_models.small_cnn)
    model.save(out / f"{stem}.h5")
    np.savez(out / f"{stem}.npz", **keras_models.tf_keras_values(model, legacy))


def load(path: str, out_path: str) -> None:
  import keras

  model = keras.saving.load_model(path)
  values = keras_models.keras3_values(keras, model)
  x, y = keras_models.batches(1, cnn=len(model.inputs[0].shape) == 4, seed=1)
  model.fit(x, y, batch_size=32, epochs=1, shuffle=False, verbose=0)
  values["iterations_after_fit"] = np.int64(model.optimizer.iterations.numpy())
  np.savez(out_path, **values)


def main(argv: list[str]) -> None:
  if os.environ.get("KERAS_BACKEND") != "tensorflow":
    sys.exit(__doc__)
  if argv[:1] == ["build"] and len(argv) == 2:
    out = pathlib.Path(argv[1])
    out.mkdir(parents=True, exist_ok=True)
    keras3(out)
    tf_keras(out)
    # Last, so a reader that finds it knows the build finished.
    files = sorted(p.name for p in out.iterdir())
    (out / "manifest.json").write_text(json.dumps(files))
  elif argv[:1] == ["load"] and len(argv) == 3:
    load(argv[1], argv[2])
  else:
    sys.exit(__doc__)


if __name__ == "__main__":
  main(sys.argv[1:])
