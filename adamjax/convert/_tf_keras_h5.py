"""tf-keras (Keras 2) ``model.save("x.h5")`` files, read as data.

The legacy HDF5 format (``tf_keras/src/saving/legacy/hdf5_format.py``) keeps the model's
config as JSON in the root attribute ``model_config``, the compile settings in
``training_config``, the layers under ``/model_weights/<layer name>/<variable name>`` listed by
the ``layer_names`` and ``weight_names`` attributes, and the optimizer under
``/optimizer_weights``. Unlike Keras 3, every optimizer variable is **named**, so slots are
paired by name, never by position:

- tf-keras's default Adam (TF >= 2.11): ``iteration:0``, ``Adam/m/dense/kernel:0``,
  ``Adam/v/dense/kernel:0``, ... (``Adam/vhat/...`` with amsgrad);
- ``tf_keras.optimizers.legacy.Adam``: ``Adam/iter:0``, ``Adam/dense/kernel/m:0``, ...,
  all ``m`` first, then all ``v``.

Neither stores the learning rate as a variable in this format: it comes from
``training_config``. Keras 3 itself does not restore this optimizer state (its legacy loader
drops it), which is one reason to read it here.
"""

from __future__ import annotations

import os
import re
from typing import Any

import numpy as np

from adamjax.convert import _keras_config
from adamjax.convert._ir import ConversionError, KerasAdamState, KerasCheckpoint, KerasLayer
from adamjax.convert._keras_config import LayerSpec, ModelSpec, OptimizerSpec
from adamjax.convert._safe_io import DEFAULT_MAX_BYTES, SafeH5, clip, materialize, open_h5

# New optimizer: <optimizer>/<slot>/<layer>/<var>:0; legacy: <optimizer>/<layer>/<var>/<slot>:0.
_NEW_SLOT = re.compile(r"^[^/]+/(m|v|vhat)/(.+):0$")
_LEGACY_SLOT = re.compile(r"^[^/]+/(.+)/(m|v|vhat):0$")
_SLOT_NAMES = {"m": "momentum", "v": "velocity", "vhat": "velocity_hat"}


def _variable_owner(name: str, by_user_name: dict[str, LayerSpec], source: str) -> LayerSpec:
  """The layer a TF variable name belongs to: ``dense/kernel:0`` -> dense; a sub-layer's
  ``lstm/lstm_cell/kernel:0`` -> lstm (the innermost enclosing name that is a model layer)."""
  parts = name.removesuffix(":0").split("/")
  for part in reversed(parts[:-1]):
    if part in by_user_name:
      return by_user_name[part]
  raise ConversionError(f"{source}: variable {clip(name)} belongs to no layer of the model config")


def _named(
  ls: LayerSpec, weights: list[tuple[str, Any]], names: tuple[str, ...], source: str
) -> dict[str, Any]:
  """A layer's variables by Keras name: by their TF names where those are Keras's
  (``dense/kernel:0``), else by position (tf-keras writes ``layer.weights`` in Keras's order:
  an LSTM's ``lstm_cell/kernel``, ``recurrent_kernel``, ``bias`` are ``cell/kernel``...)."""
  short = [w.removesuffix(":0").rsplit("/", 1)[-1] for w, _ in weights]
  if sorted(short) == sorted(names) and len(set(short)) == len(short):
    return {n: v for n, (_, v) in zip(short, weights, strict=True)}
  if len(weights) != len(names):
    raise ConversionError(
      f"{source}: layer {clip(ls.name)} ({ls.class_name}) has variables "
      f"{[w for w, _ in weights]} in the file, {list(names)} by its config"
    )
  return {n: v for n, (_, v) in zip(names, weights, strict=True)}


def _layers(
  h5: SafeH5, root: str, spec: ModelSpec, source: str
) -> tuple[list[KerasLayer], dict[str, tuple[str, str]]]:
  """The layers, and each TF variable name (``dense/kernel``) -> (layer path, variable)."""
  by_user_name: dict[str, LayerSpec] = {}
  for ls in spec.layers:
    if ls.name in by_user_name:
      raise ConversionError(
        f"{source}: two layers are named {clip(ls.name)}; tf-keras "
        "variable names cannot tell them apart"
      )
    by_user_name[ls.name] = ls
  found: dict[str, list[tuple[str, Any]]] = {}
  tf_names: dict[str, tuple[str, str]] = {}
  for group in h5.attr_strings(root, "layer_names") or []:
    group_path = f"{root}/{group}" if root else group
    if group_path not in h5.groups:
      raise ConversionError(f"{source}: layer_names lists {clip(group)}, which has no group")
    for weight in h5.attr_strings(group_path, "weight_names") or []:
      ls = _variable_owner(weight, by_user_name, source)
      found.setdefault(ls.path, []).append((weight, h5.lazy(f"{group_path}/{weight}")))
  layers = []
  for ls in spec.layers:
    names = _keras_config.variable_names(ls.class_name, ls.config)
    listed = found.pop(ls.path, [])
    weights = _named(ls, listed, names, source)
    for (weight, _), var in zip(listed, weights, strict=True):
      tf_names[weight.removesuffix(":0")] = (ls.path, var)
    if names:
      layers.append(
        KerasLayer(
          ls.path,
          ls.class_name,
          {n: weights[n] for n in names},
          _keras_config.trainable_names(ls.class_name, names, ls.trainable, ls.config),
          ls.config,
        )
      )
  return layers, tf_names


def _optimizer(
  h5: SafeH5,
  layers: list[KerasLayer],
  tf_names: dict[str, tuple[str, str]],
  optimizer: OptimizerSpec | None,
  source: str,
) -> KerasAdamState | None:
  names = h5.attr_strings("optimizer_weights", "weight_names") or []
  if optimizer is None:
    raise ConversionError(
      f"{source}: the file has optimizer weights but its training_config names no optimizer"
    )
  iterations = None
  new_style = "iteration:0" in names  # tf-keras's default Adam; else optimizers.legacy.Adam
  slots: dict[str, dict[tuple[str, str], np.ndarray]] = {k: {} for k in _SLOT_NAMES.values()}
  for name in names:
    value = h5.lazy(f"optimizer_weights/{name}")
    if name == "iteration:0" or re.fullmatch(r"[^/]+/iter:0", name):
      if value.shape != () or value.dtype.kind not in "iu" or iterations is not None:
        raise ConversionError(
          f"{source}: optimizer weight {clip(name)} is not a single integer step counter"
        )
      iterations = int(value)
      continue
    match = (_NEW_SLOT if new_style else _LEGACY_SLOT).match(name)
    if match is None:
      raise ConversionError(
        f"{source}: unexpected optimizer weight {clip(name)} (not an Adam iteration, m, v or vhat)"
      )
    slot, var = (match[1], match[2]) if new_style else (match[2], match[1])
    if var not in tf_names:
      raise ConversionError(
        f"{source}: optimizer weight {clip(name)} is the slot of {clip(var)}, "
        "which is not a variable of the model"
      )
    slots[_SLOT_NAMES[slot]][tf_names[var]] = value
  if iterations is None:
    raise ConversionError(f"{source}: the optimizer weights have no iteration counter")
  keys = [(layer.name, var) for layer in layers for var in layer.trainable]
  shapes = {(layer.name, var): v.shape for layer in layers for var, v in layer.weights.items()}
  kinds = ["momentum", "velocity"] + (["velocity_hat"] if optimizer.config.get("amsgrad") else [])
  for kind, values in slots.items():
    expected = set(keys) if kind in kinds else set()
    if set(values) != expected:
      raise ConversionError(
        f"{source}: the file has {kind} slots for {sorted(values)}; the model's "
        f"trainable variables are {keys}" + ("" if kind in kinds else " and amsgrad is off")
      )
    for key, value in values.items():
      if value.shape != shapes[key] or value.dtype.kind != "f":
        raise ConversionError(
          f"{source}: the {kind} of {key[0]}/{key[1]} is "
          f"{value.dtype}{value.shape}, the variable {shapes[key]}"
        )
  lr = optimizer.config.get("learning_rate")
  if not (lr is None or isinstance(lr, dict) or _real_number(lr)):
    raise ConversionError(
      f"{source}: training_config's learning_rate {clip(lr)} is not a number or a schedule"
    )
  return KerasAdamState(
    class_name=optimizer.class_name,
    config=dict(optimizer.config),
    iterations=iterations,
    learning_rate=None if isinstance(lr, dict) or lr is None else np.float32(lr),
    momentums={k: slots["momentum"][k] for k in keys},
    velocities={k: slots["velocity"][k] for k in keys},
    velocity_hats={k: slots["velocity_hat"][k] for k in keys if slots["velocity_hat"]},
  )


def _real_number(value: object) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool) and abs(value) < 3e38


def read_tf_keras_h5(
  path: str | os.PathLike, *, max_bytes: int = DEFAULT_MAX_BYTES
) -> KerasCheckpoint:
  """Reads a tf-keras (Keras 2) full-model ``.h5``: weights, and Adam state if saved.

  Both of tf-keras's Adams are read: the default one (``optimizers.Adam``) and
  ``optimizers.legacy.Adam``, whose ``decay`` (time-based learning-rate decay) must be 0.
  The learning rate is the float32 of ``training_config``'s value (tf-keras keeps no
  variable for it in this format). Layers get the converter's (Keras 3, class-based) names,
  computed from ``model_config``; their user names stay in each layer's ``config``.

  Args:
    path: The ``.h5`` file written by tf-keras ``model.save``.
    max_bytes: Cap on the bytes the file's arrays may declare.

  Returns:
    A :class:`KerasCheckpoint` with ``format="tf-keras-h5"``; ``model_config`` is tf-keras's
    (Keras 2) config, which Keras 3 cannot load from a ``.keras`` archive.

  Raises:
    ConversionError: for an unsafe file, a ``model_config``/``training_config`` refused by the
      allow-list (e.g. a Lambda), an optimizer other than Adam/AdamW, a legacy ``decay``, or
      weights and slots that do not match the config.
  """
  source = os.fspath(path)
  with open_h5(path, source, max_bytes) as h5:
    text = h5.attr_string("", "model_config")
    if text is None:
      raise ConversionError(
        f"{source}: no model_config attribute: not a tf-keras "
        "full-model .h5 (weights-only .h5 files need the model)"
      )
    model_config = _keras_config.load_json(text, f"{source}:model_config")
    spec = _keras_config.parse_model_config(model_config, f"{source}:model_config")
    optimizer = None
    training = h5.attr_string("", "training_config")
    if training is not None:
      training_config = _keras_config.load_json(training, f"{source}:training_config")
      _keras_config.check_config(training_config, f"{source}:training_config")
      if isinstance(training_config, dict) and training_config.get("optimizer_config"):
        optimizer = _keras_config.parse_optimizer_config(
          training_config["optimizer_config"], f"{source}:training_config", "$.optimizer_config"
        )
    root = "model_weights" if "model_weights" in h5.groups else ""
    layers, tf_names = _layers(h5, root, spec, source)
    notes = [
      ("tf-keras stores no learning-rate variable in .h5: learning_rate is training_config's value")
    ]
    state = None
    if "optimizer_weights" in h5.groups:
      state = _optimizer(h5, layers, tf_names, optimizer, source)
    else:
      notes = [
        (
          "the file holds no optimizer weights (saved with "
          "include_optimizer=False or before compiling)"
        )
      ]
    return materialize(
      KerasCheckpoint(
        format="tf-keras-h5",
        layers=layers,
        optimizer=state,
        model_config=model_config,
        notes=tuple(notes),
      )
    )
