"""Keras 3 ``.weights.h5`` and ``.keras`` files written from a :class:`KerasCheckpoint`.

The layout is Keras's own (``keras/src/saving/saving_lib.py``): a ``vars`` group per saved
object with its ``name`` attribute, layer groups named after their class, and the optimizer's
variables at ``/optimizer/vars/<i>`` in ``optimizer.variables`` order: ``iteration`` (int64),
``learning_rate`` (float32, unless a schedule), ``(momentum, velocity)`` per trainable variable,
then AMSGrad's ``velocity_hat`` per variable. Keras restores that list by position and checks
only its length (``base_optimizer.py`` ``load_own_variables``), so the writer checks everything
else: every slot present, shaped like its variable, and the layout matching the optimizer
config Keras will rebuild.

Files are written to a temporary file beside the target and moved into place in one step.
"""

from __future__ import annotations

import datetime
import io
import json
import os
import zipfile
from typing import Any

import numpy as np

from adamjax.convert import _keras_config
from adamjax.convert._ir import ConversionError, KerasCheckpoint, snake_case
from adamjax.convert._keras_config import ModelSpec, owner_path
from adamjax.convert._safe_io import _h5py, atomic_output

# The Keras release whose layout this writer reproduces, written to metadata.json when Keras
# itself is not installed.
KERAS_VERSION = "3.15.1"


def _ordered_weights(layer: Any, config: dict[str, Any] | None) -> dict[str, list[np.ndarray]]:
  """Sub-group (``""`` for the layer's own, ``"cell"`` for an RNN's cell) -> values in order."""
  names = _keras_config.variable_names(layer.class_name, config or layer.config)
  if not names or set(names) != set(layer.weights):
    raise ConversionError(
      f"layer {layer.name!r} ({layer.class_name}) has variables "
      f"{list(layer.weights)}; Keras's {layer.class_name} has "
      f"{list(names)}"
    )
  groups: dict[str, list[np.ndarray]] = {"": []}
  for n in names:
    groups.setdefault(n.rpartition("/")[0], []).append(np.asarray(layer.weights[n]))
  return groups


def _layer_groups(path: str, name: str, groups: dict[str, list[np.ndarray]]):
  for sub, values in groups.items():
    group = owner_path(path) + (f"/{sub}" if sub else "")
    yield group + "/vars", name if not sub else sub.rsplit("/", 1)[-1], values


def _groups(
  ckpt: KerasCheckpoint, spec: ModelSpec | None
) -> list[tuple[str, str, list[np.ndarray]]]:
  """``(vars group, name attribute, values)`` for the model, in the order Keras writes them."""
  if spec is None:
    return [
      group
      for layer in ckpt.layers
      for group in _layer_groups(
        layer.name, layer.name.rsplit("/", 1)[-1], _ordered_weights(layer, None)
      )
    ]
  expected = [s.path for s in spec.layers if _keras_config.variable_names(s.class_name, s.config)]
  if [layer.name for layer in ckpt.layers] != expected:
    raise ConversionError(
      f"the checkpoint's layers {[x.name for x in ckpt.layers]} are not "
      f"the model config's layers with variables {expected}"
    )
  by_name = {layer.name: layer for layer in ckpt.layers}
  out = [("vars", spec.name, [])]
  for s in spec.saved:
    layer = by_name.get(s.path)
    groups = _ordered_weights(layer, s.config) if layer is not None else {"": []}
    if layer is not None:
      trainable = _keras_config.trainable_names(
        s.class_name, tuple(layer.weights), s.trainable, s.config
      )
      if set(trainable) != set(layer.trainable):
        raise ConversionError(
          f"layer {s.path!r}: the checkpoint has {sorted(layer.trainable)} trainable, "
          f"the model config {sorted(trainable)}; Keras would pair the optimizer's "
          "slots with other variables"
        )
    out.extend(_layer_groups(s.path, s.name, groups))
  return out


def _optimizer_values(ckpt: KerasCheckpoint, spec: ModelSpec | None) -> list[np.ndarray]:
  """``optimizer.variables`` in Keras's order, checked against the config Keras will use.

  The layout follows the checkpoint (a learning-rate variable if it stores a learning rate,
  one ``velocity_hat`` per variable if it has any); the checkpoint's own optimizer config and
  the model config's compiled optimizer (which Keras rebuilds before loading) must agree.
  """
  opt = ckpt.optimizer
  has_lr, amsgrad = opt.learning_rate is not None, bool(opt.velocity_hats)
  configs = [("the checkpoint's optimizer config", opt.config)]
  if spec is not None and spec.optimizer is not None:
    if spec.optimizer.class_name != opt.class_name:
      raise ConversionError(
        f"the checkpoint holds {opt.class_name} state but the model "
        f"config compiles {spec.optimizer.class_name}"
      )
    configs.append(("the model config's optimizer", spec.optimizer.config))
  for what, config in configs:
    for key in ("use_ema", "gradient_accumulation_steps"):
      if config.get(key):
        raise ConversionError(
          f"{what} has {key}={config[key]!r}: Keras would expect "
          "variables the checkpoint does not hold"
        )
    if "amsgrad" in config and bool(config["amsgrad"]) != amsgrad:
      raise ConversionError(
        f"{what} has amsgrad={config['amsgrad']} but the checkpoint "
        f"has {len(opt.velocity_hats)} velocity_hat slots"
      )
    if "learning_rate" in config and isinstance(config["learning_rate"], dict) == has_lr:
      raise ConversionError(
        f"{what} has a learning-rate "
        + (
          "schedule (Keras keeps no variable for it), but the checkpoint stores a learning rate"
          if has_lr
          else "constant, but the checkpoint stores no learning_rate value"
        )
      )
  if not 0 <= opt.iterations < 2**63:
    raise ConversionError(f"iterations={opt.iterations} does not fit Keras's int64")
  keys = ckpt.trainable_keys()
  slots = {"momentum": opt.momentums, "velocity": opt.velocities}
  if amsgrad:
    slots["velocity_hat"] = opt.velocity_hats
  shapes = {
    (layer.name, var): np.shape(value)
    for layer in ckpt.layers
    for var, value in layer.weights.items()
  }
  layout = _keras_config.keras3_slot_layout(len(keys), learning_rate=has_lr, amsgrad=amsgrad)
  out: list[np.ndarray] = [np.asarray(opt.iterations, np.int64)]
  if has_lr:
    out.append(np.asarray(opt.learning_rate, np.float32))
  out.extend([None] * (layout["total"][0] - len(out)))
  for kind, values in slots.items():
    extra = sorted(set(values) - set(keys))
    if extra:
      raise ConversionError(
        f"the checkpoint has {kind} slots for {extra}, which are not "
        "trainable variables of its layers"
      )
    for i, key in enumerate(keys):
      if key not in values:
        raise ConversionError(f"the checkpoint has no {kind} slot for {key[0]}/{key[1]}")
      value = np.asarray(values[key])
      if value.shape != shapes[key]:
        raise ConversionError(
          f"the {kind} slot of {key[0]}/{key[1]} has shape "
          f"{value.shape}, the variable {shapes[key]}"
        )
      out[layout[kind][i]] = value
  return out


def _write_h5(target: Any, ckpt: KerasCheckpoint, spec: ModelSpec | None) -> None:
  h5py = _h5py()
  groups = _groups(ckpt, spec)
  optimizer = None
  if ckpt.optimizer is not None:
    optimizer = _optimizer_values(ckpt, spec)
    name = ckpt.optimizer.config.get("name") or snake_case(ckpt.optimizer.class_name)
    groups.append(("optimizer/vars", str(name), optimizer))
  with h5py.File(target, "w") as f:
    for path, name, values in groups:
      group = f.create_group(path)
      group.attrs["name"] = name
      for i, value in enumerate(values):
        group[str(i)] = np.asarray(value, order="C")  # (ascontiguousarray makes 0-d 1-d)


def _spec(model_config: dict[str, Any] | None, what: str) -> ModelSpec | None:
  if model_config is None:
    return None
  if "module" not in model_config:
    raise ConversionError(
      f"{what}: the model config is not a Keras 3 config (no 'module'; "
      "a tf-keras model_config?), which Keras 3 cannot load"
    )
  return _keras_config.parse_model_config(model_config, what)


def write_keras_weights_h5(
  ckpt: KerasCheckpoint, path: str | os.PathLike, *, model_config: dict[str, Any] | None = None
) -> None:
  """Writes ``ckpt`` as a Keras 3 ``.weights.h5`` with its Adam state.

  Keras restores the optimizer state from it only into a built optimizer, and otherwise
  skips it with just a warning: ``model.optimizer.build(model.trainable_variables)`` before
  ``model.load_weights(path)``.

  Args:
    ckpt: The checkpoint; its layer names are the h5 group names (``dense_1``,
      ``sequential/conv2d``).
    path: The output file (replaced atomically).
    model_config: A Keras 3 config (default ``ckpt.model_config`` if it is a Keras 3 one);
      with one, every layer and nested model gets its group and user ``name`` as Keras writes
      them, and the optimizer's layout is checked against the compiled optimizer.

  Raises:
    ConversionError: if the layers or slots do not match each other or the config, or the
      optimizer config needs variables the checkpoint does not hold (EMA, accumulation).
  """
  if model_config is not None:
    spec = _spec(model_config, f"{os.fspath(path)} (model_config)")
  elif ckpt.model_config is not None and "module" in ckpt.model_config:
    spec = _spec(ckpt.model_config, f"{os.fspath(path)} (the checkpoint's model_config)")
  else:
    spec = None  # no config, or a tf-keras one: layer groups only, named by class
  with atomic_output(path) as tmp:
    _write_h5(tmp, ckpt, spec)


def write_keras_archive(
  ckpt: KerasCheckpoint,
  path: str | os.PathLike,
  model_config: dict[str, Any] | None = None,
  *,
  keras_version: str | None = None,
) -> None:
  """Writes ``ckpt`` as a Keras 3 ``.keras`` archive that ``keras.saving.load_model`` restores.

  The archive holds ``metadata.json``, ``config.json`` and ``model.weights.h5``, stored
  uncompressed, as ``model.save`` writes them. ``load_model`` builds the optimizer from the
  config's ``compile_config`` before loading, so its Adam state (``iterations`` included) is
  restored without further calls.

  Args:
    ckpt: The checkpoint.
    path: The output file (replaced atomically).
    model_config: The model's Keras 3 config (``config.json`` contents); default
      ``ckpt.model_config``.
    keras_version: For ``metadata.json``; default the installed Keras's, else
      :data:`KERAS_VERSION`.

  Raises:
    ConversionError: if there is no Keras 3 config, it is refused by the allow-list, it
      compiles no optimizer while ``ckpt`` has Adam state (Keras would drop it), or the
      checkpoint does not match it.
  """
  config = ckpt.model_config if model_config is None else model_config
  source = os.fspath(path)
  if config is None:
    raise ConversionError(
      f"{source}: a .keras archive needs the model's Keras config; the "
      "checkpoint has none, so pass model_config (or write .weights.h5)"
    )
  spec = _spec(config, f"{source} (model_config)")
  if ckpt.optimizer is not None and spec.optimizer is None:
    raise ConversionError(
      f"{source}: the model config compiles no optimizer, so Keras "
      "would load the model without the checkpoint's Adam state"
    )
  buffer = io.BytesIO()
  _write_h5(buffer, ckpt, spec)
  if keras_version is None:
    try:
      from importlib.metadata import version

      keras_version = version("keras")
    except Exception:  # noqa: BLE001 - any failure means "not installed"
      keras_version = KERAS_VERSION
  metadata = {
    "keras_version": keras_version,
    "date_saved": datetime.datetime.now().strftime("%Y-%m-%d@%H:%M:%S"),
  }
  with atomic_output(path) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as archive:
    archive.writestr("metadata.json", json.dumps(metadata))
    archive.writestr("config.json", json.dumps(config))
    archive.writestr("model.weights.h5", buffer.getvalue())
