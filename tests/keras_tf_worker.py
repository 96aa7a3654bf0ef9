"""Run Keras 3 Adam on the TensorFlow backend and write its trajectory (used by reference_runners).

Usage: KERAS_BACKEND=tensorflow python keras_tf_worker.py INPUTS.npz CONFIG.json OUTPUT.npz

INPUTS.npz holds `param_<i>` (initial values) and `grad_<i>` (`[steps, *shape]`) for i in
0..num_variables-1; CONFIG.json holds `{"config": <keras.optimizers.Adam kwargs>,
"num_variables": n}`. OUTPUT.npz receives `params_<i>`, `momentum_<i>`, `velocity_<i>`
(and `velocity_hat_<i>` with amsgrad), each `[steps, *shape]`, and `iterations` `[steps]`.

Each step is one eager `optimizer.apply_gradients(zip(grads, variables))`: no `tf.function`,
no XLA, so every Keras op runs as its own TensorFlow CPU kernel.

It runs in its own process because a process holds one Keras backend and the tests use JAX.
"""

import json
import os
import sys

import numpy as np


def main(inputs_path: str, config_path: str, output_path: str) -> None:
  import keras
  import tensorflow as tf
  from reference_runners import (
    _keras_slots,
    _variable_name,
    keras_slot_indices,
    make_keras_optimizer,
  )

  if keras.backend.backend() != "tensorflow":
    sys.exit(
      f"keras_tf_worker.py needs KERAS_BACKEND=tensorflow, Keras is on "
      f"{keras.backend.backend()!r} (KERAS_BACKEND={os.environ.get('KERAS_BACKEND')!r})"
    )
  with open(config_path) as f:
    spec = json.load(f)
  config, n = spec["config"], spec["num_variables"]
  with np.load(inputs_path) as data:
    params = [data[f"param_{i}"] for i in range(n)]
    grads = [tf.constant(data[f"grad_{i}"]) for i in range(n)]

  variables = [keras.Variable(p, name=_variable_name(i)) for i, p in enumerate(params)]
  optimizer = make_keras_optimizer(keras, config, variables, spec["names"])
  slots = _keras_slots(config)
  index = keras_slot_indices(optimizer, variables, slots)
  tracked = {"params": variables}
  tracked.update({s: [optimizer.variables[k] for k in index[s]] for s in slots})
  iteration = optimizer.variables[index["iteration"][0]]

  steps = int(grads[0].shape[0])
  record = {key: [] for key in tracked}
  iterations = []
  for t in range(steps):
    optimizer.apply_gradients(zip([g[t] for g in grads], variables, strict=True))
    for key, vs in tracked.items():
      # tf.identity copies the current value (resource variables update in place).
      record[key].append([tf.identity(v.value) for v in vs])
    iterations.append(tf.identity(iteration.value))

  out = {"iterations": tf.stack(iterations).numpy().astype(np.int64)}
  for key, rows in record.items():
    for i in range(n):
      out[f"{key}_{i}"] = tf.stack([r[i] for r in rows]).numpy()
  np.savez(output_path, **out)


if __name__ == "__main__":
  if len(sys.argv) != 4:
    sys.exit(__doc__)
  main(*sys.argv[1:])
