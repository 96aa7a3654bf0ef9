"""Read Keras models saved in TensorFlow formats into a :class:`KerasCheckpoint`, without TF.

- :func:`read_tf_checkpoint`: ``tf.train.Checkpoint(model=model, optimizer=model.optimizer)``
  from Keras 3 or tf-keras (Keras 2, new or ``legacy`` Adam), saved with ``save``/``write`` or a
  ``CheckpointManager`` (a directory: the latest checkpoint is taken from its ``checkpoint``
  file).
- :func:`read_savedmodel`: the variables of a SavedModel (``variables/variables.*``; the graph in
  ``saved_model.pb`` is never read). ``tf.saved_model.save(model)`` keeps the optimizer;
  ``model.export()`` keeps weights only.
- :func:`read_orbax_callback` (from ``_orbax_callback.py``): ``keras.callbacks.OrbaxCheckpoint``.

TF checkpoints store neither layer names nor layer classes. Each layer's class is inferred from
its variables (``infer_layer_class``) and named the way Keras names h5 groups
(``class_layer_names``: ``dense``, ``dense_1``, ...). Slots are tied to their variables through
the object graph (``_tf_graph.py``, ``_tf_optimizer.py``), never by key prefix or slot name.
The optimizer's config is not stored either: only what the files hold (iterations, learning
rate, AMSGrad's extra slot, legacy Adam's betas) is filled in, and the notes say so.
"""

from __future__ import annotations

import ast
import os
import re

import numpy as np

from adamjax.convert._ir import (
  LAYER_VARIABLES,
  ConversionError,
  KerasAdamState,
  KerasCheckpoint,
  KerasLayer,
  class_layer_names,
  infer_layer_class,
)
from adamjax.convert._orbax_callback import read_orbax_callback
from adamjax.convert._safe_io import clip
from adamjax.convert._tf_graph import NEVER_TRAINABLE, Graph, is_model, model_layers
from adamjax.convert._tf_optimizer import Slots, adam_slots

__all__ = ["read_orbax_callback", "read_savedmodel", "read_tf_checkpoint", "resolve_prefix"]

_MAX_STATE_FILE_BYTES = 1 << 20
_STATE_LINE = re.compile(r'^\s*model_checkpoint_path\s*:\s*"((?:[^"\\]|\\.)*)"\s*$')
# Every Keras variable name LAYER_VARIABLES knows, in an order that lists each class's
# variables in Keras's own order; infer_layer_class reads the names in order.
_CANONICAL = tuple(dict.fromkeys(v for names in LAYER_VARIABLES.values() for v in names))
_NAMING_NOTE = (
  "layer names are Keras's class-based names (dense, dense_1, ...): a TF "
  "checkpoint stores no layer names or classes, so each class was inferred from "
  "the layer's variables"
)


def resolve_prefix(path: str | os.PathLike) -> str:
  """The TensorBundle prefix a user most likely means by ``path``.

  Args:
    path: A prefix (``.../ckpt-3``), its ``.index`` file, or a directory: one written by
      ``Checkpoint.save``/``CheckpointManager`` (its ``checkpoint`` file names the latest
      save) or holding exactly one ``.index``.

  Returns:
    The prefix, without ``.index``.

  Raises:
    ConversionError: if no checkpoint is found, the ``checkpoint`` file is malformed or
      points outside its directory, or ``path`` is a SavedModel directory.
  """
  path = os.fspath(path)
  if os.path.isdir(path):
    if os.path.isfile(os.path.join(path, "saved_model.pb")):
      raise ConversionError(f"{path}: a SavedModel directory; use read_savedmodel")
    state = os.path.join(path, "checkpoint")
    if os.path.isfile(state):
      return _latest_checkpoint(path, state)
    indexes = sorted(f for f in os.listdir(path) if f.endswith(".index"))
    if len(indexes) == 1:
      return os.path.join(path, indexes[0].removesuffix(".index"))
    raise ConversionError(
      f"{path}: no 'checkpoint' file and {len(indexes)} .index files: "
      "pass the prefix of the checkpoint to read"
    )
  if path.endswith(".index"):
    return path.removesuffix(".index")
  if os.path.isfile(path + ".index"):
    return path
  raise ConversionError(f"{path}: not a TensorFlow checkpoint (no {path}.index)")


def _latest_checkpoint(directory: str, state: str) -> str:
  """Reads ``model_checkpoint_path`` from a ``CheckpointState`` text proto, as data."""
  if os.path.getsize(state) > _MAX_STATE_FILE_BYTES:
    raise ConversionError(f"{state}: too large for a checkpoint state file")
  with open(state, encoding="utf-8", errors="replace") as f:
    matches = [m for line in f if (m := _STATE_LINE.match(line))]
  if len(matches) != 1:
    raise ConversionError(f"{state}: expected one model_checkpoint_path line, found {len(matches)}")
  escaped = matches[0].group(1)
  try:
    # Text-format strings use C escapes, which a Python string literal reads the same way;
    # literal_eval only ever builds the literal.
    name = ast.literal_eval(f'"{escaped}"')
  except (SyntaxError, ValueError):
    raise ConversionError(f"{state}: malformed model_checkpoint_path") from None
  try:
    os.fsencode(name)
    encodable = True
  except UnicodeEncodeError:
    encodable = False
  if "\x00" in name or not name or not encodable:
    raise ConversionError(f"{state}: model_checkpoint_path {clip(name)} is not a file name")
  directory = os.path.abspath(directory)
  prefix = os.path.normpath(os.path.join(directory, name))
  if os.path.dirname(prefix) != directory:
    raise ConversionError(
      f"{state}: model_checkpoint_path {clip(name)} points outside "
      f"{directory}; pass the prefix explicitly"
    )
  return prefix


def read_tf_checkpoint(
  path: str | os.PathLike, *, verify_crc: bool = True, max_bytes: int | None = None
) -> KerasCheckpoint:
  """Reads a Keras model (and its Adam state) from a ``tf.train.Checkpoint`` TensorBundle.

  Args:
    path: The checkpoint prefix, its ``.index``, or its directory (see :func:`resolve_prefix`).
    verify_crc: Check every tensor's CRC32C.
    max_bytes: Cap on the bytes the tensors decode to (default: the converter's, 4 GiB).

  Returns:
    A ``KerasCheckpoint`` with format ``"tf-checkpoint"``: the layers that own variables in
    model order, each variable marked trainable iff the optimizer keeps slots for it (BatchNorm
    moving statistics and frozen layers are not), and the Adam state tied to the variables by
    object identity. ``optimizer`` is None when the checkpoint has none, or the optimizer had
    not been built yet.

  Raises:
    ConversionError: if the files are malformed or unsafe, hold no Keras model, or the
      optimizer is not Adam or uses an option the IR cannot carry (loss scaling, EMA, legacy
      ``decay``).
  """
  graph = Graph.open(resolve_prefix(path), verify_crc=verify_crc, max_bytes=max_bytes)
  model_id, opt_id = _find_model(graph)
  if model_id is None:
    raise graph.fail(
      f"no Keras model in this checkpoint (root objects: "
      f"{graph.child_names(0)}); save it as "
      "tf.train.Checkpoint(model=model, optimizer=model.optimizer)"
    )
  return _from_model(graph, model_id, opt_id, "tf-checkpoint")


def read_savedmodel(
  path: str | os.PathLike, *, verify_crc: bool = True, max_bytes: int | None = None
) -> KerasCheckpoint:
  """Reads a Keras model's variables from a SavedModel directory, as data.

  Only ``variables/variables.{index,data-*}`` is read: ``saved_model.pb`` holds functions
  (programs), which are never loaded.

  Args:
    path: The SavedModel directory.
    verify_crc: Check every tensor's CRC32C.
    max_bytes: Cap on the bytes the tensors decode to (default: the converter's, 4 GiB).

  Returns:
    A ``KerasCheckpoint`` with format ``"savedmodel"``. For ``tf.saved_model.save(model)`` of a
    compiled model the optimizer is tracked and read as by :func:`read_tf_checkpoint`; a
    ``model.export()`` archive holds weights only (``optimizer`` None, and a note says so),
    grouped into layers by the variables' paths.

  Raises:
    ConversionError: if the directory has no variables bundle, or as
      :func:`read_tf_checkpoint`.
  """
  path = os.fspath(path)
  prefix = os.path.join(path, "variables", "variables")
  if not os.path.isfile(prefix + ".index"):
    raise ConversionError(f"{path}: not a SavedModel directory (no variables/variables.index)")
  graph = Graph.open(prefix, verify_crc=verify_crc, max_bytes=max_bytes)
  model_id, opt_id = _find_model(graph)
  if model_id is not None:
    checkpoint = _from_model(graph, model_id, opt_id, "savedmodel")
    if checkpoint.optimizer is None:
      checkpoint.notes += ("weights only: this SavedModel holds no optimizer state",)
    return checkpoint
  root = set(graph.child_names(0))
  if {"variables", "trainable_variables"} <= root:
    return _from_export(graph)
  raise graph.fail(f"no Keras model in this SavedModel (root objects: {sorted(root)})")


def _find_model(graph: Graph) -> tuple[int | None, int | None]:
  """The model's and the optimizer's nodes: children of the root, or the root itself."""
  model_id = graph.child(0, "model")
  if model_id is None and is_model(graph, 0):
    model_id = 0  # tf.saved_model.save(model), or Checkpoint(root=model).
  opt_id = graph.child(0, "optimizer")
  if opt_id is None and model_id is not None:
    opt_id = graph.child(model_id, "optimizer")  # A compiled model tracks its optimizer.
  return model_id, opt_id


def _from_model(graph: Graph, model_id: int, opt_id: int | None, fmt: str) -> KerasCheckpoint:
  layer_vars = model_layers(graph, model_id)
  slots = adam_slots(graph, opt_id, layer_vars) if opt_id is not None else None
  notes = [_NAMING_NOTE]
  if slots is None:
    notes.append(
      "no Adam state: "
      + (
        "the checkpoint has no optimizer"
        if opt_id is None
        else "the optimizer had not been built (saved before the first step)"
      )
    )
    notes.append(
      "trainable variables inferred from layer classes: a frozen layer cannot "
      "be recognised without optimizer slots"
    )
  layers, names = _named_layers(graph, layer_vars, set(slots.trainable) if slots else None)
  optimizer = None
  if slots is not None:
    optimizer = _adam_state(graph, slots, names)
    if slots.flavour == "tf-keras legacy":
      notes.append(
        "tf-keras legacy Adam: the checkpoint stores beta_1 and beta_2 but not "
        "epsilon, which takes Keras's default unless given"
      )
    else:
      notes.append(
        f"{slots.flavour} Adam: the checkpoint stores no optimizer config, so "
        "beta_1, beta_2, epsilon and the other options take Keras's defaults "
        "unless given, and AdamW cannot be told apart from Adam"
      )
  return KerasCheckpoint(format=fmt, layers=layers, optimizer=optimizer, notes=tuple(notes))


def _from_export(graph: Graph) -> KerasCheckpoint:
  """``model.export()``: flat variable lists, grouped into layers by each variable's path."""
  trainable = set(graph.items(graph.child(0, "trainable_variables")))
  groups: dict[str, dict[str, int]] = {}
  for node in graph.items(graph.child(0, "variables")):
    layer_path, _, name = (graph.nodes[node].full_name or "").rpartition("/")
    if name == "seed_generator_state":
      continue  # A Dropout's RNG state (keras.random.SeedGenerator), not a weight.
    if not layer_path or name in groups.get(layer_path, {}):
      raise graph.fail(
        f"cannot place exported variable {clip(graph.nodes[node].full_name)} in a layer"
      )
    if groups and layer_path in groups and layer_path != list(groups)[-1]:
      raise graph.fail(f"the variables of layer {clip(layer_path)} are not contiguous")
    groups.setdefault(layer_path, {})[name] = node
  depths = {path.count("/") for path in groups}
  roots = {path.split("/")[0] for path in groups}
  if depths != {1} or len(roots) != 1:
    # Keras 3 paths are "<model>/<layer>/<variable>"; anything deeper is a nested model.
    raise graph.fail(
      f"exported variables are not one flat model's (layer paths "
      f"{sorted(groups)[:6]}): nested models are not supported"
    )
  layers, _ = _named_layers(graph, list(groups.values()), trainable)
  return KerasCheckpoint(
    format="savedmodel",
    layers=layers,
    optimizer=None,
    notes=(_NAMING_NOTE, "weights only: a SavedModel from model.export() holds no optimizer state"),
  )


def _named_layers(
  graph: Graph, layer_vars: list[dict[str, int]], trainable: set[int] | None
) -> tuple[list[KerasLayer], dict[int, tuple[str, str]]]:
  """Builds the IR's layers and maps each variable node to its ``(layer, variable)`` key."""
  classes, weights = [], []
  for i, variables in enumerate(layer_vars):
    values = {name: graph.value(variables[name]) for name in sorted(variables, key=_canonical_rank)}
    try:
      classes.append(infer_layer_class(values))
    except ConversionError as e:
      raise graph.fail(f"layer {i}: {e}") from None
    weights.append(values)
  layers, names = [], {}
  for layer_name, class_name, values, variables in zip(
    class_layer_names(classes), classes, weights, layer_vars, strict=True
  ):
    order = [v for v in LAYER_VARIABLES[class_name] if v in values]
    if trainable is None:
      is_trainable = [v for v in order if v not in NEVER_TRAINABLE]
    else:
      is_trainable = [v for v in order if variables[v] in trainable]
    layers.append(
      KerasLayer(
        name=layer_name,
        class_name=class_name,
        weights={v: values[v] for v in order},
        trainable=tuple(is_trainable),
      )
    )
    names.update({variables[v]: (layer_name, v) for v in order})
  if trainable is not None and not trainable <= set(names):
    raise graph.fail("the optimizer trains variables that belong to no layer of the model")
  return layers, names


def _canonical_rank(name: str) -> int:
  return _CANONICAL.index(name) if name in _CANONICAL else len(_CANONICAL)


def _adam_state(graph: Graph, slots: Slots, names: dict[int, tuple[str, str]]) -> KerasAdamState:
  iterations = int(graph.scalar(slots.iterations_id, "i", "iterations"))
  if iterations < 0:
    raise graph.fail(f"negative iterations {iterations}")
  learning_rate = None
  if slots.learning_rate_id is not None:
    learning_rate = np.float32(graph.scalar(slots.learning_rate_id, "f", "learning_rate"))

  def by_name(mapping: dict[int, int]) -> dict[tuple[str, str], np.ndarray]:
    return {names[var]: graph.value(slot) for var, slot in mapping.items()}

  return KerasAdamState(
    class_name="Adam",
    config=dict(slots.config),
    iterations=iterations,
    learning_rate=learning_rate,
    momentums=by_name(slots.momentums),
    velocities=by_name(slots.velocities),
    velocity_hats=by_name(slots.velocity_hats),
  )
