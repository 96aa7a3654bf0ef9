"""The converter's output: an Orbax checkpoint of Flax variables, adamjax Adam state and step.

Layout of a converted checkpoint directory::

    <dir>/state/...             Orbax StandardSave of {"params", "batch_stats", "opt_state", "step"}
    <dir>/adamjax_convert.json  what was converted: source, format, Keras layers and optimizer

``opt_state`` is ``converted_optimizer(ckpt, params).init(params)`` filled from Keras's slots, so ``restore_converted`` can rebuild the abstract target
from the JSON alone and Orbax returns the optimizer's NamedTuples, not bare dicts.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import jax
import numpy as np
import optax

from adamjax.convert import _flax, _safe_io
from adamjax.convert._ir import ConversionError, KerasAdamState, KerasCheckpoint, KerasLayer

METADATA = "adamjax_convert.json"
STATE = "state"
BATCH_STATS = frozenset({"moving_mean", "moving_variance"})  # Flax's BatchStat collection.


def flax_variables(ckpt: KerasCheckpoint) -> dict[str, dict[str, Any]]:
  """``{"params": ..., "batch_stats": ...}`` as Flax names them, built from the checkpoint alone.

  Module names are the Keras layer names; BatchNorm moving statistics go to ``batch_stats``
  and the other variables Keras creates untrainable (Normalization's statistics) go to
  ``batch_stats`` (NNX ``BatchStat``), every other variable to ``params`` (NNX ``Param``).
  """
  from adamjax.convert.layers import LAYERS

  paths = _flax.variable_paths(ckpt.layers)
  out: dict[str, dict[str, Any]] = {"params": {}, "batch_stats": {}}
  for layer in ckpt.layers:
    cls = LAYERS.get(layer.class_name)
    stats = cls.non_trainable(layer.config or {}) if cls is not None else BATCH_STATS
    for var, value in layer.weights.items():
      node = out["batch_stats" if var in stats else "params"]
      *modules, leaf = paths[layer.name, var]
      for name in modules:
        node = node.setdefault(name, {})
      node[leaf] = np.asarray(value)
  return out


def trainable_mask(ckpt: KerasCheckpoint, params: Any) -> Any | None:
  """``params``-shaped booleans, True where Keras trains the variable; None if all are trained."""
  paths = _flax.variable_paths(ckpt.layers)
  trained = {paths[layer.name, var] for layer in ckpt.layers for var in layer.trainable}
  mask = jax.tree_util.tree_map_with_path(lambda p, _: _flax._keys(p) in trained, params)
  return None if all(jax.tree.leaves(mask)) else mask


def converted_optimizer(ckpt: KerasCheckpoint, params: Any) -> optax.GradientTransformation:
  """``keras_optimizer(ckpt)`` on Keras's trainable variables; the frozen ones never change.

  With a frozen layer this is ``optax.multi_transform`` with labels ``"trainable"`` (Keras Adam)
  and ``"frozen"`` (``optax.set_to_zero``): ``optax.masked`` alone would pass the frozen
  variables' raw gradients through as updates.
  """
  tx = _flax.keras_optimizer(ckpt)
  mask = trainable_mask(ckpt, params)
  if mask is None:
    return tx
  labels = jax.tree.map(lambda trained: "trainable" if trained else "frozen", mask)
  return optax.multi_transform({"trainable": tx, "frozen": optax.set_to_zero()}, labels)


def _layers_json(layers: list[KerasLayer]) -> list[dict[str, Any]]:
  return [
    {
      "name": layer.name,
      "class_name": layer.class_name,
      "weights": {
        var: [list(np.shape(v)), str(np.asarray(v).dtype)] for var, v in layer.weights.items()
      },
      "trainable": list(layer.trainable),
      "config": layer.config,
    }
    for layer in layers
  ]


def _layers_from_json(rows: list[dict[str, Any]]) -> list[KerasLayer]:
  """The layers the metadata lists, with zero-stride placeholder arrays of their shapes and
  dtypes (``np.broadcast_to``: nothing of the listed size is allocated)."""
  return [
    KerasLayer(
      row["name"],
      row["class_name"],
      {
        var: np.broadcast_to(np.zeros((), np.dtype(dtype)), tuple(shape))
        for var, (shape, dtype) in row["weights"].items()
      },
      tuple(row["trainable"]),
      row.get("config"),
    )
    for row in rows
  ]


def converted_tree(ckpt: KerasCheckpoint) -> tuple[dict[str, Any], dict[str, Any]]:
  """Everything ``to-jax`` writes, built and checked in memory: ``(tree, metadata)``.

  ``tree`` is ``{"params", "batch_stats", "opt_state", "step"}``; weights only (no
  ``opt_state``, ``step``) for a model compiled with an optimizer other than Adam/AdamW
  (``ckpt.dropped_optimizer``). ``metadata`` holds the layers and the model's checked Keras
  config, as data, so :func:`adamjax.convert.flax_model` rebuilds the model from the
  directory. ``info`` runs this too, so a checkpoint ``info`` accepts is one ``to-jax``
  converts.

  Raises:
    ConversionError: if the checkpoint has no optimizer state (and dropped none) or cannot be
      continued exactly (an unsupported option, a value out of range, an empty or non-numeric
      array).
  """
  check_values(ckpt)
  variables = flax_variables(ckpt)
  tree = {"params": variables["params"], "batch_stats": variables["batch_stats"]}
  opt = ckpt.optimizer
  if opt is not None:
    tx = converted_optimizer(ckpt, variables["params"])
    tree["opt_state"] = _flax.adam_state(ckpt, tx, variables["params"])
    tree["step"] = np.int32(opt.iterations)
  elif ckpt.dropped_optimizer is None:
    _flax._require_optimizer(ckpt)  # Raises: no optimizer state, and none was dropped.
  meta = {
    "format": ckpt.format,
    "notes": list(ckpt.notes),
    "layers": _layers_json(ckpt.layers),
    "optimizer": None
    if opt is None
    else {
      "class_name": opt.class_name,
      "config": opt.config,
      "learning_rate": None if opt.learning_rate is None else float(opt.learning_rate),
      "iterations": opt.iterations,
      "amsgrad": bool(opt.velocity_hats),
    },
    "dropped_optimizer": ckpt.dropped_optimizer,
    "model_config": ckpt.model_config,
  }
  try:
    json.dumps(meta, default=_json_default, allow_nan=False)
  except (TypeError, ValueError) as e:
    raise ConversionError(
      f"{ckpt.source or ckpt.format}: the checkpoint's metadata cannot be written as JSON "
      f"({_safe_io.clip(str(e))})"
    ) from None
  return tree, meta


def check_values(ckpt: KerasCheckpoint) -> None:
  """Every array non-empty, numeric, native byte order; the optimizer's scalars in range.

  Raises:
    ConversionError: naming the variable and the problem.
  """
  where = ckpt.source or f"the {ckpt.format} checkpoint"
  arrays = [(f"{layer.name}/{var}", v) for layer in ckpt.layers for var, v in layer.weights.items()]
  opt = ckpt.optimizer
  if opt is not None:
    for what, slots in (
      ("momentum", opt.momentums),
      ("velocity", opt.velocities),
      ("velocity_hat", opt.velocity_hats),
    ):
      arrays += [(f"{what} of {layer}/{var}", v) for (layer, var), v in slots.items()]
  for name, value in arrays:
    value = np.asarray(value)
    problem = None
    if value.size == 0:
      problem = f"is empty (shape {value.shape}): Orbax cannot save it"
    elif value.dtype.kind not in "fiub" or not value.dtype.isnative:
      problem = f"has dtype {value.dtype.str}, which JAX cannot hold"
    if problem:
      raise ConversionError(f"{where}: variable {_safe_io.clip(name)} {problem}")
  if opt is None:
    return
  if not isinstance(opt.iterations, int) or not 0 <= opt.iterations < 2**31:
    raise ConversionError(
      f"{where}: optimizer iterations {_safe_io.clip(repr(opt.iterations))} is not an "
      "integer in [0, 2**31)"
    )
  if opt.learning_rate is not None and not (
    np.isfinite(opt.learning_rate) and opt.learning_rate >= 0
  ):
    raise ConversionError(
      f"{where}: learning rate {opt.learning_rate!r} is not a finite non-negative number"
    )
  _flax.check_optimizer_config(opt, where)


def save_converted(
  ckpt: KerasCheckpoint, directory: str | os.PathLike, *, source: str = "", overwrite: bool = False
) -> dict[str, Any]:
  """Writes ``ckpt`` as a converted Orbax checkpoint (see the module docstring).

  The directory appears complete or not at all: everything is written into a temporary sibling,
  which is renamed into place at the end.

  Returns:
    The metadata written to ``adamjax_convert.json``.

  Raises:
    ConversionError: if the checkpoint has no optimizer state or cannot be continued exactly.
    FileExistsError: if ``directory`` exists and ``overwrite`` is False.
  """
  import orbax.checkpoint as ocp

  directory = Path(directory).absolute()
  if directory.exists() and not overwrite:
    raise FileExistsError(f"{directory} exists; choose another output or pass overwrite")
  tree, meta = converted_tree(ckpt)
  meta = {"source": str(source), **meta}
  directory.parent.mkdir(parents=True, exist_ok=True)
  with _safe_io.atomic_output(directory, directory=True) as tmp:
    with ocp.StandardCheckpointer() as checkpointer:
      checkpointer.save(Path(tmp) / STATE, tree)
    (Path(tmp) / METADATA).write_text(json.dumps(meta, indent=1, default=_json_default) + "\n")
  return meta


def _json_default(x: Any) -> Any:
  if isinstance(x, np.generic):
    return x.item()
  raise TypeError(f"cannot write {type(x).__name__} to JSON")


def read_metadata(directory: str | os.PathLike) -> dict[str, Any]:
  path = Path(directory) / METADATA
  if not path.is_file():
    raise ConversionError(f"{directory} is not a converted checkpoint (no {METADATA})")
  try:
    meta = json.loads(path.read_bytes())
  except (OSError, ValueError, RecursionError) as e:
    raise ConversionError(
      f"{path}: unreadable metadata ({type(e).__name__}: {_safe_io.clip(str(e), 200)})"
    ) from None
  if not isinstance(meta, dict):
    raise ConversionError(f"{path}: the metadata is not a JSON object")
  return meta


def template(meta: dict[str, Any]) -> KerasCheckpoint:
  """A zero-valued ``KerasCheckpoint`` with the converted checkpoint's layers and optimizer.

  Raises:
    ConversionError: if the metadata (a file: possibly damaged or hostile) is malformed.
  """
  try:
    return _template(meta)
  except ConversionError:
    raise
  except Exception as e:  # noqa: BLE001 - any malformed metadata
    raise ConversionError(
      f"{METADATA}: malformed metadata ({type(e).__name__}: {_safe_io.clip(str(e), 200)})"
    ) from None


def _template(meta: dict[str, Any]) -> KerasCheckpoint:
  for row in meta["layers"]:
    if row.get("config") is not None and not isinstance(row["config"], dict):
      raise ConversionError(
        f"{METADATA}: layer {_safe_io.clip(row['name'])}: config is not an object"
      )
    for shape, _ in row["weights"].values():
      if not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**40 for d in shape):
        raise ConversionError(f"{METADATA}: shape {_safe_io.clip(shape)} is not a shape")
  # The optimizer state is built (allocated) from these shapes before Orbax reads anything.
  listed = sum(
    math.prod(shape) * np.dtype(dtype).itemsize
    for row in meta["layers"]
    for shape, dtype in row["weights"].values()
  )
  if listed > _safe_io.DEFAULT_MAX_BYTES:
    raise ConversionError(
      f"{METADATA}: the layers list {listed} bytes of variables, over the "
      f"{_safe_io.DEFAULT_MAX_BYTES}-byte budget"
    )
  layers = _layers_from_json(meta["layers"])
  o = meta["optimizer"]
  zeros = {(layer.name, var): layer.weights[var] for layer in layers for var in layer.trainable}
  if o is None:
    return KerasCheckpoint(
      meta["format"],
      layers,
      None,
      meta.get("model_config"),
      dropped_optimizer=meta.get("dropped_optimizer"),
    )
  opt = KerasAdamState(
    o["class_name"],
    o["config"],
    o["iterations"],
    None if o["learning_rate"] is None else np.float32(o["learning_rate"]),
    zeros,
    zeros,
    zeros if o["amsgrad"] else {},
  )
  return KerasCheckpoint(meta["format"], layers, opt, meta.get("model_config"))


def restore_converted(directory: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any]]:
  """Reads a converted checkpoint: ``({"params", "batch_stats", "opt_state", "step"}, meta)``
  (``opt_state`` and ``step`` only if it holds Adam state).

  The abstract target (tree structure, shapes, dtypes, optimizer NamedTuples) is rebuilt from
  the metadata, so the optimizer state comes back as the optimizer's own types.
  """
  import orbax.checkpoint as ocp

  directory = Path(directory).absolute()
  meta = read_metadata(directory)
  like = template(meta)
  variables = flax_variables(like)
  tree = {"params": variables["params"], "batch_stats": variables["batch_stats"]}
  if like.optimizer is not None:
    tree["opt_state"] = _flax.adam_state(
      like, converted_optimizer(like, variables["params"]), variables["params"]
    )
    tree["step"] = np.int32(0)
  host = jax.sharding.SingleDeviceSharding(jax.local_devices(backend="cpu")[0])
  abstract = jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype, sharding=host), tree
  )
  with ocp.StandardCheckpointer() as checkpointer:
    restored = checkpointer.restore(directory / STATE, abstract)
  return jax.tree.map(np.asarray, restored), meta


def to_keras_checkpoint(
  tree: dict[str, Any],
  layers: list[KerasLayer],
  *,
  optimizer: KerasAdamState | None,
  model_config: dict | None = None,
  fmt: str = "adamjax",
) -> KerasCheckpoint:
  """Flax variables and an adamjax Adam state as a ``KerasCheckpoint`` (for the writers).

  Args:
    tree: ``{"params": ..., "batch_stats": ..., "opt_state": ...}`` (batch_stats optional).
    layers: The Keras layers to fill (names, classes, trainable variables): a template.
    optimizer: The template's optimizer (class, config, learning rate), or None to write
      weights only.
  """
  variables = {**tree.get("batch_stats", {})}
  for name, module in tree["params"].items():
    variables[name] = {**variables.get(name, {}), **module}
  new_layers = _flax.from_flax(variables, layers)
  opt = None
  if optimizer is not None:
    opt = _flax.keras_adam_state(
      tree["opt_state"],
      tree["params"],
      new_layers,
      class_name=optimizer.class_name,
      config=optimizer.config,
      learning_rate=optimizer.learning_rate,
    )
  return KerasCheckpoint(fmt, new_layers, opt, model_config)
