"""Keras 3 ``.keras`` archives, ``.weights.h5`` and sharded ``.weights.json``: read as data.

Keras 3 stores a model's variables in HDF5 by attribute path, not by name
(``keras/src/saving/saving_lib.py`` ``_save_state``): ``/layers/<class-based name>/vars/<i>``
for each layer (``dense``, ``dense_1``: the user's name is only the ``vars`` group's ``name``
attribute), ``/layers/<model>/layers/...`` below nested models, and ``/optimizer/vars/<i>`` for
every optimizer variable **by position** (``base_optimizer.py`` ``save_own_variables``). The
datasets are named ``0, 1, ..., 10``, which h5py lists alphabetically, so they are sorted by
number here. Which optimizer variable is which follows from the compiled optimizer's config
(:func:`_keras_config.keras3_slot_layout`), which is why a bare ``.weights.h5`` is read best
with the model's ``config.json`` beside it.

Nothing from the file is executed: the config is checked against an allow-list and read as
JSON, the archive is read into memory without extracting it, and the HDF5 file is checked in
full before a value is read (:mod:`_safe_io`). The writers live in :mod:`_keras_h5_write`; the
tf-keras (Keras 2) ``.h5`` reader in :mod:`_tf_keras_h5`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from adamjax.convert import _keras_config
from adamjax.convert._ir import (
  LAYER_VARIABLES,
  STATELESS_LAYERS,
  ConversionError,
  KerasAdamState,
  KerasCheckpoint,
  KerasLayer,
  infer_layer_class,
  snake_case,
)
from adamjax.convert._keras_config import ModelSpec, OptimizerSpec, owner_path
from adamjax.convert._keras_h5_write import write_keras_archive, write_keras_weights_h5
from adamjax.convert._safe_io import (
  DEFAULT_MAX_BYTES,
  SafeH5,
  clip,
  materialize,
  open_h5,
  read_zip,
)
from adamjax.convert._tf_keras_h5 import read_tf_keras_h5

__all__ = [
  "read_keras_archive",
  "read_keras_weights_h5",
  "read_keras_weights_json",
  "read_tf_keras_h5",
  "write_keras_archive",
  "write_keras_weights_h5",
]

ARCHIVE_MEMBERS = frozenset({"config.json", "metadata.json", "model.weights.h5"})
_MAX_JSON_BYTES = 64 << 20
_MAX_SHARDS = 10_000
_CLASS_BY_SNAKE_NAME = {snake_case(c): c for c in (*LAYER_VARIABLES, *STATELESS_LAYERS)}


@dataclasses.dataclass
class _Owner:
  """The ``vars`` group of one saved object (a layer, a model, the optimizer)."""

  name: str | None
  values: dict[int, np.ndarray]


def _collect(h5: SafeH5, owners: dict[str, _Owner]) -> None:
  """Adds every ``<owner>/vars/<i>`` of one (checked) file to ``owners``, in file order."""
  for group in h5.groups:
    if group == "vars" or group.endswith("/vars"):
      owner = owners.setdefault(group[:-4].rstrip("/"), _Owner(None, {}))
      name = h5.attr_string(group, "name")
      if owner.name is None:
        owner.name = name
  for path in h5.datasets:
    parent, _, leaf = path.rpartition("/")
    if not (parent == "vars" or parent.endswith("/vars")) or not re.fullmatch(
      r"0|[1-9][0-9]{0,8}", leaf
    ):
      raise ConversionError(
        f"{h5.source}: unexpected dataset /{path}: Keras writes only <object>/vars/<index>"
      )
    owner = owners[parent[:-4].rstrip("/")]
    if int(leaf) in owner.values:
      raise ConversionError(f"{h5.source}: /{path} is stored twice (in two shards)")
    owner.values[int(leaf)] = h5.lazy(path)


def _positional(owner: str, entry: _Owner, source: str) -> list[np.ndarray]:
  indices = sorted(entry.values)  # numeric order: 0, 1, 2, ..., 10 (h5py lists 0, 1, 10, 2)
  if indices != list(range(len(indices))):
    raise ConversionError(
      f"{source}: /{owner}/vars has datasets {indices}; Keras writes 0..n-1 with none missing"
    )
  return [entry.values[i] for i in indices]


def _layers_from_config(
  owners: dict[str, _Owner], spec: ModelSpec, source: str
) -> list[KerasLayer]:
  layers, known = [], {owner_path(ls.path) for ls in (*spec.layers, *spec.submodels)}
  for ls in spec.layers:
    owner = owner_path(ls.path)
    entry = owners.get(owner, _Owner(None, {}))
    names = _keras_config.variable_names(ls.class_name, ls.config)
    # Variables of sub-layers (``cell/kernel``) live in the sub-layer's own group
    # (``layers/lstm/cell/vars``), each group numbered from 0 in the layer's order.
    groups: dict[str, list[str]] = {}
    for name in names:
      groups.setdefault(name.rpartition("/")[0], []).append(name)
    weights = {}
    for sub, members in {"": [], **groups}.items():
      group = f"{owner}/{sub}" if sub else owner
      known.add(group)
      values = _positional(group, owners.get(group, _Owner(None, {})), source)
      if len(values) != len(members):
        raise ConversionError(
          f"{source}: layer {ls.path} ({ls.class_name} {clip(ls.name)}) has {len(values)} "
          f"variables in /{group}/vars but {len(members)} by its config "
          f"{[m.rpartition('/')[2] for m in members]}: the config does not describe this file"
        )
      weights.update(zip(members, values, strict=True))
    if entry.name is not None and entry.name != ls.name:
      raise ConversionError(
        f"{source}: /{owner} holds layer {clip(entry.name)}, but the "
        f"config has {clip(ls.name)} there: the config does not describe "
        "this file"
      )
    if names:
      layers.append(
        KerasLayer(
          name=ls.path,
          class_name=ls.class_name,
          weights={n: weights[n] for n in names},
          trainable=_keras_config.trainable_names(ls.class_name, names, ls.trainable, ls.config),
          config=ls.config,
        )
      )
  for owner, entry in owners.items():
    if owner.startswith("layers/") and owner not in known and entry.values:
      raise ConversionError(
        f"{source}: /{owner} holds {len(entry.values)} variables but "
        "the config has no layer there: the config does not describe "
        "this file"
      )
  return layers


def _layers_from_names(owners: dict[str, _Owner], source: str) -> list[KerasLayer]:
  """Layers of a file without a config: classes from the group names and variable shapes.

  Keras names each group after the layer's class (``dense_1`` is "the second Dense"), so the
  class is known; the variable names follow from Keras's order for that class. Every layer is
  taken as trainable: a frozen layer cannot be told apart (its variables look the same), which
  then shows as an optimizer-slot count that does not match (see :func:`_read_optimizer`).
  """
  layers = []
  for owner, entry in owners.items():
    parts = owner.split("/")
    if parts[0] != "layers" or not entry.values:
      continue  # the optimizer, the model's own (empty) vars, stateless layers
    if len(parts) % 2 or any(p != "layers" for p in parts[0::2]):
      raise ConversionError(
        f"{source}: group /{owner}/vars is a sub-layer's (an RNN cell, an attention "
        "projection...), which only the model's config can name: pass model_config (the "
        "model's config.json)"
      )
    values = _positional(owner, entry, source)
    group = parts[-1]
    class_name = _CLASS_BY_SNAKE_NAME.get(re.sub(r"_[0-9]+$", "", group))
    if class_name not in LAYER_VARIABLES:
      raise ConversionError(
        f"{source}: /{owner} holds {len(values)} variables, but {clip(group)} is not the "
        f"name of a layer class the converter supports ({sorted(LAYER_VARIABLES)}); "
        "pass model_config (the model's config.json) if it is one"
      )
    names = LAYER_VARIABLES[class_name]
    if len(values) == 1 and names == ("kernel", "bias"):
      names = ("kernel",)  # use_bias=False
    if len(values) != len(names):
      raise ConversionError(
        f"{source}: /{owner} ({class_name}) holds {len(values)} variables; without the "
        f"model's config only Keras's default {list(names)} can be named. Pass "
        "model_config (the model's config.json)"
      )
    weights = dict(zip(names, values, strict=True))
    inferred = infer_layer_class(weights)
    if inferred != class_name:
      raise ConversionError(
        f"{source}: /{owner} is named like a {class_name} but its "
        f"variables' shapes are those of a {inferred}"
      )
    name = "/".join(parts[1::2])
    layers.append(
      KerasLayer(name, class_name, weights, _keras_config.trainable_names(class_name, names, True))
    )
  return layers


def _read_optimizer(
  entry: _Owner | None, layers: list[KerasLayer], optimizer: OptimizerSpec | None, source: str
) -> tuple[KerasAdamState | None, list[str]]:
  """Pairs ``/optimizer/vars`` with the trainable variables by Keras's positional layout.

  ``optimizer`` is the compiled optimizer from the config; None means no config, in which
  case only plain Adam is accepted (with or without a learning-rate variable: a schedule or a
  tf-keras-written file has none), as the count of variables then tells the layout.
  """
  if entry is None or not entry.values:
    return None, ["the file holds no optimizer variables (weights only)"]
  values = _positional("optimizer", entry, source)
  keys = [(layer.name, var) for layer in layers for var in layer.weights if var in layer.trainable]
  shapes = {
    (layer.name, var): layer.weights[var].shape for layer in layers for var in layer.weights
  }
  n, count = len(keys), len(values)
  notes = []
  if optimizer is None:
    # No compiled optimizer to go by (a bare weights file, or a config compiled without
    # one): only plain Adam, whose variable count tells whether a learning rate is stored.
    if count not in (1 + 2 * n, 2 + 2 * n):
      raise ConversionError(
        f"{source}: /optimizer/vars holds {count} variables, but plain Adam over the "
        f"{n} trainable variables of this file's layers has {2 + 2 * n} ({1 + 2 * n} "
        "without a learning-rate variable). Without the model's config the converter "
        "cannot tell frozen layers (they have no slots), amsgrad, use_ema or gradient "
        "accumulation; pass model_config (the model's config.json)"
      )
    layout = _keras_config.keras3_slot_layout(n, learning_rate=count == 2 + 2 * n)
    optimizer = OptimizerSpec("Adam", {})
    notes.append(
      "no optimizer config (a bare .weights.h5 stores none): Adam with Keras's "
      "default hyperparameters is assumed; pass model_config for the real ones"
    )
  else:
    layout = _keras_config.optimizer_slot_layout(optimizer, n)
    unbuilt = _keras_config.optimizer_slot_layout(optimizer, 0)["total"][0]
    if n and count == unbuilt and int(values[0]) == 0:
      # Compiled, saved before any step: Keras builds the slots (zeros) at the first step.
      return _unbuilt_state(optimizer, values, layers, keys), [
        "the optimizer was compiled but never stepped (Keras builds its slots at the first "
        "step): the Adam state starts from zero moments at iteration 0, as Keras's would"
      ]
    if layout["total"][0] != count:
      raise ConversionError(
        f"{source}: /optimizer/vars holds {count} variables, but {optimizer.class_name} "
        f"with this config over the model's {n} trainable variables has "
        f"{layout['total'][0]}: the file and the config disagree"
      )

  def slot(kind: str, i: int) -> np.ndarray:
    value = values[layout[kind][i]]
    if value.shape != shapes[keys[i]] or value.dtype.kind != "f":
      raise ConversionError(
        f"{source}: /optimizer/vars/{layout[kind][i]} should be the {kind} of "
        f"{keys[i][0]}/{keys[i][1]} {shapes[keys[i]]}, but is {value.dtype}"
        f"{value.shape}: the layers and the optimizer's variables disagree"
      )
    return value

  iteration = values[0]
  if iteration.shape != () or iteration.dtype.kind not in "iu":
    raise ConversionError(
      f"{source}: /optimizer/vars/0 (iteration) is {iteration.dtype}"
      f"{iteration.shape}, not an integer scalar"
    )
  learning_rate = None
  if layout["learning_rate"]:
    lr = values[1]
    if lr.shape != () or lr.dtype.kind != "f":
      raise ConversionError(
        f"{source}: /optimizer/vars/1 (learning_rate) is {lr.dtype}{lr.shape}, not a float scalar"
      )
    learning_rate = np.float32(lr)
  if layout["average"]:
    notes.append("use_ema: the exponential moving averages of the weights are not carried")
  if layout["accumulator"]:
    notes.append(
      "gradient_accumulation_steps: iterations is Keras's raw counter of "
      "micro-batches (optimizer.iterations is it // steps); the partially "
      "accumulated gradients are not carried"
    )
  return KerasAdamState(
    class_name=optimizer.class_name,
    config=dict(optimizer.config),
    iterations=int(iteration),
    learning_rate=learning_rate,
    momentums={k: slot("momentum", i) for i, k in enumerate(keys)},
    velocities={k: slot("velocity", i) for i, k in enumerate(keys)},
    velocity_hats={
      k: slot("velocity_hat", i) for i, k in enumerate(keys) if layout["velocity_hat"]
    },
  ), notes


def _unbuilt_state(
  optimizer: OptimizerSpec, values: list[np.ndarray], layers: list[KerasLayer], keys: list
) -> KerasAdamState:
  shapes = {(layer.name, var): layer.weights[var] for layer in layers for var in layer.weights}
  zeros = {k: np.zeros(shapes[k].shape, shapes[k].dtype) for k in keys}
  learning_rate = None
  if optimizer.has_learning_rate_variable and len(values) > 1:
    lr = values[1]
    if lr.shape != () or lr.dtype.kind != "f":
      raise ConversionError(f"/optimizer/vars/1 (learning_rate) is {lr.dtype}{lr.shape}")
    learning_rate = np.float32(lr)
  return KerasAdamState(
    class_name=optimizer.class_name,
    config=dict(optimizer.config),
    iterations=0,
    learning_rate=learning_rate,
    momentums=dict(zeros),
    velocities=dict(zeros),
    velocity_hats=dict(zeros) if optimizer.config.get("amsgrad") else {},
  )


def _checkpoint(
  owners: dict[str, _Owner],
  spec: ModelSpec | None,
  fmt: str,
  source: str,
  model_config: dict[str, Any] | None,
) -> KerasCheckpoint:
  if spec is not None:
    layers = _layers_from_config(owners, spec, source)
  else:
    layers = _layers_from_names(owners, source)
  dropped = spec.other_optimizer if spec else None
  if dropped is not None:
    optimizer, notes = (
      None,
      [
        f"the model is compiled with {dropped}: its weights convert, its optimizer state is not "
        "carried over (adamjax continues Adam and AdamW only)"
      ],
    )
  elif owners.get("optimizer/inner_optimizer", _Owner(None, {})).values:
    # Keras wraps the compiled optimizer in a LossScaleOptimizer under a mixed_float16 policy
    # (``compile(auto_scale_loss=True)``, the default) and saves the wrapped one's variables in
    # ``optimizer/inner_optimizer``; its own are a step counter and the dynamic loss scale.
    optimizer, notes = _read_optimizer(
      owners["optimizer/inner_optimizer"], layers, spec.optimizer if spec else None, source
    )
    outer = _positional("optimizer", owners.get("optimizer", _Owner(None, {})), source)
    scale = f"{float(np.asarray(outer[3])):g}" if len(outer) > 3 and outer[3].shape == () else "?"
    notes.append(
      f"a LossScaleOptimizer (mixed precision) wraps the Adam: its Adam state is read; its "
      f"dynamic loss scale ({scale}) is not part of the Adam state and is not carried, and "
      "a file written back holds the Adam state alone"
    )
    owners = {k: v for k, v in owners.items() if k != "optimizer/inner_optimizer"}
  else:
    optimizer, notes = _read_optimizer(
      owners.get("optimizer"), layers, spec.optimizer if spec else None, source
    )
  ignored = sorted(
    o for o, e in owners.items() if e.values and o != "optimizer" and not o.startswith("layers/")
  )
  if ignored:
    notes.append(f"ignored variables outside the layers and the optimizer: {ignored}")
  return KerasCheckpoint(
    format=fmt,
    layers=layers,
    optimizer=optimizer,
    model_config=model_config,
    notes=tuple(notes),
    dropped_optimizer=dropped,
  )


def read_keras_archive(
  path: str | os.PathLike, *, max_bytes: int = DEFAULT_MAX_BYTES
) -> KerasCheckpoint:
  """Reads a Keras 3 ``model.save("x.keras")`` archive: its config, weights and Adam state.

  Args:
    path: The ``.keras`` zip file.
    max_bytes: Cap on the bytes the archive's members (and the arrays inside the weights
      file) may declare.

  Returns:
    A :class:`KerasCheckpoint` with ``format="keras"``, the layers named as Keras's h5 groups
    (with their configs), the Adam state located by the compiled optimizer's config, and
    ``model_config`` (the checked ``config.json``).

  Raises:
    ConversionError: for an unsafe or malformed archive (unexpected or ``..`` members,
      oversize members), a config refused by the allow-list, an optimizer other than
      Adam/AdamW, or weights that do not match the config.
  """
  source = os.fspath(path)
  members = read_zip(path, ARCHIVE_MEMBERS, "assets/", max_bytes)
  for required in ("config.json", "model.weights.h5"):
    if required not in members:
      raise ConversionError(
        f"{source}: the archive has no {required} (members: "
        f"{sorted(members)}; only the h5 weights format is supported)"
      )
  if "metadata.json" in members:
    _keras_config.load_json(members["metadata.json"], f"{source}:metadata.json")
  config = _keras_config.load_json(members["config.json"], f"{source}:config.json")
  spec = _keras_config.parse_model_config(config, f"{source}:config.json")
  owners: dict[str, _Owner] = {}
  with open_h5(members.pop("model.weights.h5"), f"{source}:model.weights.h5", max_bytes) as h5:
    _collect(h5, owners)
    return materialize(_checkpoint(owners, spec, "keras", source, config))


def read_keras_weights_h5(
  path: str | os.PathLike,
  model_config: dict[str, Any] | None = None,
  *,
  max_bytes: int = DEFAULT_MAX_BYTES,
) -> KerasCheckpoint:
  """Reads a Keras 3 ``model.save_weights("x.weights.h5")`` file (also tf-keras's v3 one).

  Without ``model_config`` the layers' classes come from the group names and the variables'
  shapes, every variable but BatchNorm's moving statistics is taken as trainable, and the
  optimizer must be plain Adam: a frozen layer cannot be told from a trainable one, so a model
  with one (or with amsgrad, EMA or gradient accumulation) makes the optimizer-slot count
  disagree, and the error says to pass the config. The layer order is the order Keras wrote
  the groups (the model's order), and every optimizer slot's shape is checked against it.

  Args:
    path: The ``.weights.h5`` file.
    model_config: The model's Keras 3 config (``config.json`` contents), checked against the
      allow-list like an archive's.
    max_bytes: Cap on the bytes the file's arrays may declare.

  Returns:
    A :class:`KerasCheckpoint` with ``format="weights.h5"``.

  Raises:
    ConversionError: for an unsafe or malformed file, or variables that do not match the
      config (or, without one, that cannot be named or paired with the optimizer's slots).
  """
  source = os.fspath(path)
  spec = (
    None
    if model_config is None
    else _keras_config.parse_model_config(model_config, f"{source} (model_config)")
  )
  owners: dict[str, _Owner] = {}
  with open_h5(path, source, max_bytes) as h5:
    if "model_weights" in h5.groups or h5.attr_string("", "model_config") is not None:
      raise ConversionError(
        f"{source}: a tf-keras (Keras 2) full-model .h5, not a Keras 3 "
        "weights file; read it with read_tf_keras_h5"
      )
    _collect(h5, owners)
    return materialize(_checkpoint(owners, spec, "weights.h5", source, model_config))


def read_keras_weights_json(
  path: str | os.PathLike,
  model_config: dict[str, Any] | None = None,
  *,
  max_bytes: int = DEFAULT_MAX_BYTES,
) -> KerasCheckpoint:
  """Reads sharded Keras 3 weights: ``save_weights("x.weights.json", max_shard_size=...)``.

  The JSON index maps each ``vars`` group to the shard files (beside it) that hold it; one
  group may span several shards, so the shards are merged before anything is paired. Shard
  names must be plain file names in the index's folder.

  Args:
    path: The ``.weights.json`` index.
    model_config: As for :func:`read_keras_weights_h5`.
    max_bytes: Cap on the bytes all shards' arrays may declare together.

  Returns:
    A :class:`KerasCheckpoint` with ``format="weights.json"``.

  Raises:
    ConversionError: as :func:`read_keras_weights_h5`, and for a malformed index or a shard
      name that points outside the index's folder.
  """
  path = Path(path)
  source = os.fspath(path)
  if path.stat().st_size > _MAX_JSON_BYTES:
    raise ConversionError(f"{source}: the index is larger than {_MAX_JSON_BYTES} bytes")
  index = _keras_config.load_json(path.read_bytes(), source)
  weight_map = index.get("weight_map") if isinstance(index, dict) else None
  if not isinstance(weight_map, dict):
    raise ConversionError(f"{source}: not a Keras sharded-weights index (no weight_map)")
  shards: list[str] = []
  for group, files in weight_map.items():
    if not isinstance(files, (str, list)):
      raise ConversionError(
        f"{source}: weight_map[{clip(group)}] is {type(files).__name__}, not a shard name "
        "or a list of them"
      )
    for name in [files] if isinstance(files, str) else files:
      if (
        not isinstance(name, str)
        or os.path.basename(name) != name
        or name.startswith(".")
        or not name.endswith(".h5")
        or "\x00" in name
      ):
        raise ConversionError(
          f"{source}: refusing shard name {clip(name)} for {clip(group)}: "
          "shards must be .h5 files in the index's folder"
        )
      if name not in shards:
        shards.append(name)
        if len(shards) > _MAX_SHARDS:
          raise ConversionError(f"{source}: the index names more than {_MAX_SHARDS} shards")
  spec = (
    None
    if model_config is None
    else _keras_config.parse_model_config(model_config, f"{source} (model_config)")
  )
  owners: dict[str, _Owner] = {}
  budget = max_bytes
  with contextlib.ExitStack() as files:
    for name in shards:
      h5 = files.enter_context(open_h5(path.parent / name, f"{source}:{name}", budget))
      budget -= sum(math.prod(s) * d.itemsize for s, d in h5.datasets.values())
      _collect(h5, owners)
    return materialize(_checkpoint(owners, spec, "weights.json", source, model_config))
