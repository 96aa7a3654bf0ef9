"""Read the directory ``keras.callbacks.OrbaxCheckpoint`` writes into a :class:`KerasCheckpoint`.

The callback (Keras 3.15, ``keras/src/callbacks/orbax_checkpoint.py``) saves, per step
``<dir>/<step>/``, two Orbax checkpointables:

- ``pytree``: ``model.get_state_tree()``, i.e. ``trainable_variables``/``non_trainable_variables``
  nested by variable path (``sequential/dense/kernel``) and ``optimizer_variables/<optimizer>``
  with ``iteration``, ``learning_rate`` and one slot per trainable variable named
  ``<path with '/' -> '_'>_momentum`` (``_velocity``, ``_velocity_hat``);
- ``model_config``: ``{"config": <the model's JSON config>}``, absent with
  ``save_weights_only=True``.

Arrays are read with orbax-checkpoint as plain numpy (no pickles, no Keras, no TensorFlow). The
config is parsed as JSON data and checked against the converter's allow-list
(``_keras_config.check_config``); it gives the layer order and classes, which the state tree (a
dict, restored in sorted order) does not keep. Slot names are matched against the names built
from the known variable paths, never split on ``_`` (``dense_1_kernel`` is ambiguous).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os

import numpy as np

from adamjax.convert._ir import ConversionError, KerasAdamState, KerasCheckpoint, KerasLayer
from adamjax.convert._keras_config import (
  ModelSpec,
  check_config,
  load_json,
  parse_model_config,
  variable_names,
)
from adamjax.convert._safe_io import clip

__all__ = ["read_orbax_callback"]

_SLOT_SUFFIXES = {
  "momentums": "_momentum",
  "velocities": "_velocity",
  "velocity_hats": "_velocity_hat",
}


def read_orbax_callback(path: str | os.PathLike) -> KerasCheckpoint:
  """Reads a ``keras.callbacks.OrbaxCheckpoint`` directory (the latest step) or one step of it.

  Args:
    path: The callback's ``directory`` (the highest numbered step is read) or a step
      directory (``<directory>/<step>``).

  Returns:
    A ``KerasCheckpoint`` with format ``"orbax-callback"``: layers in the config's order, named
    by class (``dense``, ``dense_1``), with their Keras layer config; the Adam state with the
    optimizer config from the model's ``compile_config``.

  Raises:
    ConversionError: if no step is found, the checkpoint has no model config (saved with
      ``save_weights_only=True``), the model is nested or holds unsupported layers, the
      optimizer is not Adam/AdamW, or variables and slots do not match.
  """
  step = _step_dir(os.fspath(path))
  _check_handlers(step)
  if not os.path.isdir(os.path.join(step, "model_config")):
    raise ConversionError(
      f"{step}: no model_config (saved with save_weights_only=True?): "
      "the layer order and classes are unknown, so it is refused"
    )
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel

  try:
    tree = ocp.v1.load(step, checkpointable_name="pytree")
    with _quiet_string_only_warning():
      config_tree = ocp.v1.load(step, checkpointable_name="model_config")
  except MemoryError:
    raise
  except Exception as e:  # noqa: BLE001 - a third-party reader's boundary (see below)
    # orbax-checkpoint and TensorStore raise whatever their parsers meet on a damaged file
    # (ValueError, KeyError, TypeError, AttributeError on a metadata file of the wrong JSON
    # shape, ...): every one of them here means this file cannot be read.
    raise ConversionError(
      f"{step}: unreadable Orbax checkpoint ({type(e).__name__}: {clip(str(e), 200)})"
    ) from None
  if (
    not isinstance(tree, dict)
    or not isinstance(config_tree, dict)
    or not isinstance(config_tree.get("config"), str)
  ):
    raise ConversionError(f"{step}: unexpected checkpoint structure")
  source = f"{step}/model_config"
  config = load_json(config_tree["config"], source)
  check_config(config, source)  # The allow-list: refuses Lambda, custom objects, ...
  spec = parse_model_config(config, source, check=False)
  layers, paths = _layers(step, tree, spec)
  optimizer = _optimizer(step, tree, spec, layers, paths)
  notes = (
    (
      "layer names are Keras's class-based names (dense, dense_1, ...); the user's "
      "layer names are in each layer's config"
    ),
  )
  return KerasCheckpoint(
    format="orbax-callback", layers=layers, optimizer=optimizer, model_config=config, notes=notes
  )


@contextlib.contextmanager
def _quiet_string_only_warning():
  """Drops orbax's "TensorStore data files not found" log line for the config checkpointable.

  The callback stores the config as a lone string, which orbax 0.12.8 warns may mean a
  "malformed checkpoint"; for this checkpointable it is the expected layout.
  """

  def keep(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("TensorStore data files not found")

  root = logging.getLogger()
  root.addFilter(keep)
  try:
    yield
  finally:
    root.removeFilter(keep)


def _step_dir(path: str) -> str:
  if os.path.isdir(os.path.join(path, "pytree")):
    return path
  try:
    steps = [
      int(name)
      for name in os.listdir(path)
      if name.isdigit() and os.path.isfile(os.path.join(path, name, "_CHECKPOINT_METADATA"))
    ]
  except OSError as e:
    raise ConversionError(f"{path}: cannot list the checkpoint directory ({e})") from None
  if not steps:
    raise ConversionError(f"{path}: no finished Orbax checkpoint step in this directory")
  return os.path.join(path, str(max(steps)))


def _check_handlers(step: str) -> None:
  """Both checkpointables must be plain PyTrees, as the callback writes them."""
  metadata = os.path.join(step, "_CHECKPOINT_METADATA")
  try:
    with open(metadata, encoding="utf-8") as f:
      handlers = json.loads(f.read(1 << 20)).get("item_handlers") or {}
  except (OSError, ValueError, AttributeError, RecursionError) as e:
    raise ConversionError(
      f"{metadata}: unreadable checkpoint metadata ({type(e).__name__}: {clip(str(e), 200)})"
    ) from None
  for name in ("pytree", "model_config"):
    handler = handlers.get(name) if isinstance(handlers, dict) else None
    if handler is not None and not str(handler).endswith(".PyTreeHandler"):
      raise ConversionError(
        f"{metadata}: checkpointable {clip(name)} uses handler "
        f"{clip(handler)}, not a PyTree of arrays; refused"
      )


def _flatten(tree, prefix=()) -> dict[tuple[str, ...], object]:
  if isinstance(tree, dict):
    out = {}
    for key, value in tree.items():
      out.update(_flatten(value, prefix + (str(key),)))
    return out
  return {prefix: tree}


def _layers(
  step: str, tree: dict, spec: ModelSpec
) -> tuple[list[KerasLayer], dict[tuple[str, str], str]]:
  """The IR layers, and each ``(layer, variable)``'s Keras path (for the slot names)."""
  if spec.submodels:
    raise ConversionError(
      f"{step}: nested models ({[s.path for s in spec.submodels]}) "
      "are not supported in Orbax callback checkpoints"
    )
  found: dict[tuple[str, str], dict[str, tuple[np.ndarray, bool]]] = {}
  for group, trainable in (("trainable_variables", True), ("non_trainable_variables", False)):
    for path, value in _flatten(tree.get(group, {})).items():
      if path[-1] == "seed_generator_state":
        continue  # A Dropout's RNG state (keras.random.SeedGenerator), not a weight.
      if len(path) != 3 or path[0] != spec.name:
        raise ConversionError(
          f"{step}: variable {'/'.join(path)} is not {spec.name}/<layer>/<variable>"
        )
      found.setdefault(path[1], {})[path[2]] = (np.asarray(value), trainable)
  layers, paths = [], {}
  for layer in spec.layers:
    variables = found.pop(layer.name, {})
    expected = variable_names(layer.class_name, layer.config)
    if set(variables) != set(expected):
      raise ConversionError(
        f"{step}: layer {clip(layer.name)} ({layer.class_name}) has "
        f"variables {sorted(variables)}, its config says "
        f"{list(expected)}"
      )
    if not variables:
      continue
    layers.append(
      KerasLayer(
        name=layer.path,
        class_name=layer.class_name,
        weights={v: variables[v][0] for v in expected},
        trainable=tuple(v for v in expected if variables[v][1]),
        config=layer.config,
      )
    )
    paths.update({(layer.path, v): f"{spec.name}/{layer.name}/{v}" for v in expected})
  if found:
    raise ConversionError(
      f"{step}: variables of layers missing from the model config: {sorted(found)}"
    )
  return layers, paths


def _optimizer(
  step: str,
  tree: dict,
  spec: ModelSpec,
  layers: list[KerasLayer],
  paths: dict[tuple[str, str], str],
) -> KerasAdamState | None:
  groups = tree.get("optimizer_variables") or {}
  if not groups:
    return None
  if len(groups) != 1:
    raise ConversionError(f"{step}: several optimizers {sorted(groups)}")
  if spec.optimizer is None:
    raise ConversionError(
      f"{step}: optimizer variables but no compiled optimizer in the model config"
    )
  ((opt_name, variables),) = groups.items()
  class_name = spec.optimizer.class_name  # Adam or AdamW: parse_model_config refuses others.
  opt_config = dict(spec.optimizer.config)
  variables = dict(_flatten(variables))
  unused = {key[0]: key for key in variables if len(key) == 1}
  if len(unused) != len(variables):
    raise ConversionError(f"{step}: optimizer {clip(opt_name)} has nested variables")
  slots = {kind: {} for kind in _SLOT_SUFFIXES}
  keys = {}
  for key in (k for layer in layers for k in ((layer.name, v) for v in layer.trainable)):
    base = paths[key].replace("/", "_")
    for kind, suffix in _SLOT_SUFFIXES.items():
      name = base + suffix
      if name in keys:
        raise ConversionError(
          f"{step}: slot name {clip(name)} is ambiguous between {keys[name]} and {key}"
        )
      keys[name] = key
      if unused.pop(name, None) is not None:
        slots[kind][key] = np.asarray(variables[(name,)])
  iteration = variables.get(("iteration",))
  unused.pop("iteration", None)
  learning_rate = variables.get(("learning_rate",))
  unused.pop("learning_rate", None)
  if unused:
    raise ConversionError(
      f"{step}: optimizer variables that are not Adam's slots of a "
      f"trainable variable: {sorted(unused)[:6]} (not Adam, or an "
      "unsupported option such as use_ema)"
    )
  trainable = [k for layer in layers for k in ((layer.name, v) for v in layer.trainable)]
  for kind in ("momentums", "velocities"):
    if set(slots[kind]) != set(trainable):
      raise ConversionError(
        f"{step}: {kind} exist for {len(slots[kind])} of the {len(trainable)} trainable variables"
      )
  if slots["velocity_hats"] and set(slots["velocity_hats"]) != set(trainable):
    raise ConversionError(f"{step}: velocity_hats do not cover the trainable variables")
  has_hats = bool(slots["velocity_hats"])
  if has_hats != bool(opt_config.get("amsgrad", has_hats)):
    raise ConversionError(
      f"{step}: amsgrad={opt_config.get('amsgrad')} in the config but "
      f"{len(slots['velocity_hats'])} velocity_hat slots"
    )
  for kind, values in slots.items():
    for key, value in values.items():
      weight = next(layer.weights[key[1]] for layer in layers if layer.name == key[0])
      if value.shape != weight.shape:
        raise ConversionError(
          f"{step}: {kind} slot of {paths[key]} has shape "
          f"{value.shape}, the variable {weight.shape}"
        )
  iteration = np.asarray(iteration)
  if iteration.shape != () or iteration.dtype.kind not in "iu" or int(iteration) < 0:
    raise ConversionError(f"{step}: iteration {clip(iteration)} is not a non-negative integer")
  if learning_rate is not None:
    learning_rate = np.float32(np.asarray(learning_rate))
  return KerasAdamState(
    class_name=class_name,
    config=opt_config,
    iterations=int(iteration),
    learning_rate=learning_rate,
    momentums=slots["momentums"],
    velocities=slots["velocities"],
    velocity_hats=slots["velocity_hats"],
  )
