"""The Keras side of train/parity.py: the tutorial MLP trained by Keras on TensorFlow, step by step.

:func:`train_keras` runs in a subprocess with ``KERAS_BACKEND=tensorflow``
(``adamjax.testing.call_in_keras_backend`` loads this file by path there), so the parity
check's own process holds JAX and never TensorFlow. Only NumPy at module level; Keras and
TensorFlow are imported inside the function.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

# The trainable parameters as "<layer>/<variable>", Keras's names, in Keras's trainable order.
PARAM_NAMES = ("dense/kernel", "dense/bias", "dense_1/kernel", "dense_1/bias")


def dropout_scale(rate: float) -> np.float32:
  """The float32 factor kept activations are multiplied by, as ``tf.nn`` dropout computes it.

  TensorFlow forms ``1 / (1 - rate)`` in Python floats and converts it to the input's dtype
  (``nn_ops._dropout``); Flax's and Keras-JAX's dropout divide by ``1 - rate`` instead, which
  can differ by an ulp. Both sides of the parity check multiply by this one value.
  """
  return np.float32(1 / (1 - rate))


def train_keras(arrays: dict[str, np.ndarray], spec: dict[str, Any]) -> dict[str, np.ndarray]:
  """Trains the tutorial model in Keras (TensorFlow backend) on the given batches.

  Args:
    arrays: ``images`` uint8 [steps, batch, 28, 28] (scaled by 1/255 here, as the tutorial
      does), ``labels`` int32 [steps, batch], optionally ``masks`` bool [steps, batch, hidden]
      (keep masks for the hidden layer; without them, no dropout).
    spec: ``seed``, ``hidden``, ``dropout_rate``, ``learning_rate``, ``threads`` (TensorFlow's
      intra- and inter-op threads), ``eager`` (op by op instead of a ``tf.function``) and
      ``recorded`` (the 1-based steps after which to record the parameters).

  Returns:
    ``init/<name>`` (initial weights), ``params/<name>`` ([len(recorded), *shape]),
    ``grads_step1/<name>``, ``loss`` (f32 [steps]), ``iterations`` and ``versions`` (JSON).
  """
  import keras
  import tensorflow as tf

  from adamjax.testing import tutorial_mlp

  # Before any op runs; TensorFlow fixes its thread pools at the first op.
  tf.config.threading.set_intra_op_parallelism_threads(spec["threads"])
  tf.config.threading.set_inter_op_parallelism_threads(spec["threads"])
  images, labels, masks = arrays["images"], arrays["labels"], arrays.get("masks")

  keras.utils.set_random_seed(spec["seed"])
  model = tutorial_mlp(
    keras,
    optimizer=keras.optimizers.Adam(learning_rate=spec["learning_rate"]),
    hidden=spec["hidden"],
    dropout_rate=spec["dropout_rate"],
  )
  named = {f"{layer.name}/{v.name}": v for layer in model.layers for v in layer.weights}
  if tuple(named) != PARAM_NAMES:
    raise ValueError(f"unexpected Keras variables {list(named)}, expected {list(PARAM_NAMES)}")
  variables = list(named.values())
  flatten, dense, dense_1 = (model.get_layer(n) for n in ("flatten", "dense", "dense_1"))
  scale = tf.constant(dropout_scale(spec["dropout_rate"]))

  def forward(x, keep):
    if keep is None:
      return model(x, training=False)  # The Dropout layer is the identity.
    h = dense(flatten(x))  # Dense applies its relu.
    # tf.nn dropout's arithmetic with a given mask: scale first, then zero the dropped.
    return dense_1(tf.where(keep, h * scale, tf.zeros_like(h)))

  def train_step(x, y, keep):
    with tf.GradientTape() as tape:
      loss = model.loss(y, forward(x, keep))
    grads = tape.gradient(loss, variables)
    model.optimizer.apply_gradients(zip(grads, variables, strict=True))
    return loss, grads

  if not spec["eager"]:  # As Model.fit runs its train step (no XLA on CPU: jit_compile off).
    train_step = tf.function(train_step, jit_compile=False)

  out = {f"init/{n}": v.numpy() for n, v in named.items()}
  recorded = set(spec["recorded"])
  params: dict[str, list[np.ndarray]] = {n: [] for n in named}
  losses = []
  for t in range(len(labels)):
    # The tutorial's `x / 255.0` (float64 in NumPy), cast to float32 as Keras casts inputs.
    x = tf.constant((images[t] / 255.0).astype(np.float32))
    keep = None if masks is None else tf.constant(masks[t])
    loss, grads = train_step(x, tf.constant(labels[t]), keep)
    losses.append(np.float32(loss.numpy()))
    if t == 0:
      out.update({f"grads_step1/{n}": g.numpy() for n, g in zip(named, grads, strict=True)})
    if t + 1 in recorded:
      for n, v in named.items():
        params[n].append(v.numpy())  # .numpy() copies; the variable updates in place.
  out.update({f"params/{n}": np.stack(p) for n, p in params.items()})
  out["loss"] = np.array(losses, np.float32)
  out["iterations"] = np.int64(model.optimizer.iterations.numpy())
  versions = {
    "keras": keras.__version__,
    "tensorflow": tf.__version__,
    "TF_ENABLE_ONEDNN_OPTS": os.environ.get("TF_ENABLE_ONEDNN_OPTS"),
  }
  out["versions"] = np.array(json.dumps(versions))
  return out


def train_keras_model(arrays: dict[str, np.ndarray], spec: dict[str, Any]) -> dict[str, np.ndarray]:
  """Trains a ``.keras`` model file in Keras (TensorFlow backend), as ``Model.train_step`` does.

  Each step: the outputs in training mode, ``model.compute_loss`` (the compiled loss plus
  ``model.losses``: activity and weight-regularizer penalties), the optimizer's ``scale_loss``,
  the gradients of the trainable variables, ``optimizer.apply_gradients`` (which applies the
  weight constraints after the update); metrics are left out.

  Args:
    arrays: ``x0, x1, ...`` (the inputs, all N examples), ``y0, y1, ...`` (the targets) and
      ``index`` int64 [steps, batch] (the rows of each step).
    spec: ``model`` (the file), ``seed``, ``threads``, ``eager``, ``recorded``,
      ``dense_gradients`` (densify IndexedSlices gradients before the optimizer),
      ``perturb_seed`` (optional: start from the weights moved by one ulp, signs from this seed).

  Returns:
    ``names`` (Keras's variable paths, ``model.weights`` order), ``trainable`` (bool per name),
    ``init/<i>``, ``params/<i>`` ([len(recorded), *shape]), ``grads_step1/<i>`` (trainable
    ones), ``loss`` (f32 [steps], the total loss), ``iterations``, ``versions`` (JSON),
    ``sparse_gradients`` (JSON: the variables whose gradients were IndexedSlices), with
    ``<i>`` the variable's position in ``names``.
  """
  import keras
  import tensorflow as tf

  tf.config.threading.set_intra_op_parallelism_threads(spec["threads"])
  tf.config.threading.set_inter_op_parallelism_threads(spec["threads"])
  keras.utils.set_random_seed(spec["seed"])
  # safe_mode (the default) refuses lambdas and other code in the file.
  model = keras.saving.load_model(spec["model"], compile=True, safe_mode=True)
  if model.optimizer is None or model.loss is None:
    raise ValueError(f"{spec['model']}: the model is not compiled with an optimizer and a loss")
  index = arrays["index"]
  count = lambda p: sum(1 for k in arrays if k.startswith(p) and k[1:].isdigit())  # noqa: E731
  xs = [arrays[f"x{i}"] for i in range(count("x"))]
  ys = [arrays[f"y{i}"] for i in range(count("y"))]
  variables = list(model.weights)
  trainable = list(model.trainable_variables)
  position = {id(v): i for i, v in enumerate(variables)}
  if spec.get("perturb_seed") is not None:
    # The noise-floor run: every trainable weight moved by one ulp, up or down at random, so
    # the run starts a rounding error away from the other and shows how training grows that.
    rng = np.random.default_rng(spec["perturb_seed"])
    for v in trainable:
      w = v.numpy()
      up = rng.random(w.shape) < 0.5
      v.assign(np.where(up, np.nextafter(w, np.inf), np.nextafter(w, -np.inf)).astype(w.dtype))

  sparse: list[str] = []  # Variables whose gradient TensorFlow gives as IndexedSlices.

  def train_step(x, y):
    with tf.GradientTape() as tape:
      y_pred = model(x, training=True)
      loss = model.compute_loss(x=x, y=y, y_pred=y_pred, training=True)
      scaled = model.optimizer.scale_loss(loss)
    grads = tape.gradient(scaled, trainable)
    for v, g in zip(trainable, grads, strict=True):  # At trace time: Python, once.
      if isinstance(g, tf.IndexedSlices) and v.path not in sparse:
        sparse.append(v.path)
    if spec["dense_gradients"]:
      # Keras's Adam on TF applies an IndexedSlices gradient slice by slice: a row repeated in
      # the batch has each slice squared on its own into v (and m decays once per slice), rows
      # not in the batch are not decayed. Densified, the update is the dense Adam of Keras-JAX.
      grads = [tf.convert_to_tensor(g) if isinstance(g, tf.IndexedSlices) else g for g in grads]
    model.optimizer.apply_gradients(zip(grads, trainable, strict=True))
    return loss, grads

  if not spec["eager"]:  # As Model.fit runs its train step (no XLA on CPU: jit_compile off).
    train_step = tf.function(train_step, jit_compile=False)

  one = lambda arrays: arrays[0] if len(arrays) == 1 else arrays  # noqa: E731
  out = {f"init/{i}": v.numpy() for i, v in enumerate(variables)}
  recorded = set(spec["recorded"])
  params: list[list[np.ndarray]] = [[] for _ in variables]
  losses = []
  for t in range(len(index)):
    x = one([tf.constant(a[index[t]]) for a in xs])
    y = one([tf.constant(a[index[t]]) for a in ys])
    loss, grads = train_step(x, y)
    losses.append(np.float32(loss.numpy()))
    if t == 0:
      out.update(
        {
          f"grads_step1/{position[id(v)]}": tf.convert_to_tensor(g).numpy()
          for v, g in zip(trainable, grads, strict=True)
        }
      )
    if t + 1 in recorded:
      for i, v in enumerate(variables):
        params[i].append(v.numpy())
  out.update({f"params/{i}": np.stack(p) for i, p in enumerate(params)})
  out["names"] = np.array([v.path for v in variables])
  out["sparse_gradients"] = np.array(json.dumps(sparse))
  out["trainable"] = np.array([any(v is w for w in trainable) for v in variables])
  out["loss"] = np.array(losses, np.float32)
  out["iterations"] = np.int64(model.optimizer.iterations.numpy())
  versions = {
    "keras": keras.__version__,
    "tensorflow": tf.__version__,
    "TF_ENABLE_ONEDNN_OPTS": os.environ.get("TF_ENABLE_ONEDNN_OPTS"),
  }
  out["versions"] = np.array(json.dumps(versions))
  return out
