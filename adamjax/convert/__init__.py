"""TensorFlow/Keras checkpoints to Flax variables and adamjax Adam state, and back.

Read any checkpoint a Keras 3 or tf-keras user has on disk, without TensorFlow and without
running anything from the file, then map it onto a Flax model and the Keras-exact optimizer::

    ckpt = adamjax.convert.read("model.keras")          # or .weights.h5, a TF checkpoint, ...
    params = adamjax.convert.to_flax(ckpt, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    tx = adamjax.convert.keras_optimizer(ckpt)          # adamjax.keras_adam, Keras's settings
    opt_state = adamjax.convert.adam_state(ckpt, tx, params)

Formats (sniffed by content, not by file name): Keras 3 ``.keras``, ``.weights.h5`` and sharded
``.weights.json``; TF2 ``tf.train.Checkpoint`` TensorBundles (read by a pure-NumPy reader);
tf-keras (Keras 2) ``.h5`` full models; ``keras.callbacks.OrbaxCheckpoint`` directories;
SavedModel variables (weights only). Writers: ``.keras`` and ``.weights.h5`` with the optimizer
state, which Keras loads and continues from. ``python -m adamjax.convert --help`` is the
command line.

Security: untrusted files never reach a code-executing loader (no pickle, no Keras or TF
deserialization, no SavedModel functions); configs are checked against an allow-list, and
HDF5, zip and TensorBundle contents are validated before use. Needs h5py and orbax-checkpoint
(``pip install adamjax[convert]``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from adamjax.convert._flax import (
  FLAX_NAMES,
  adam_state,
  from_flax,
  keras_adam_state,
  keras_optimizer,
  to_flax,
)
from adamjax.convert._ir import ConversionError, KerasAdamState, KerasCheckpoint, KerasLayer
from adamjax.convert._orbax import (
  converted_optimizer,
  flax_variables,
  restore_converted,
  save_converted,
  to_keras_checkpoint,
  trainable_mask,
)

__all__ = [
  "FLAX_NAMES",
  "ConversionError",
  "KerasAdamState",
  "KerasCheckpoint",
  "KerasLayer",
  "adam_state",
  "converted_optimizer",
  "flax_model",
  "flax_variables",
  "from_flax",
  "keras_adam_state",
  "keras_optimizer",
  "read",
  "restore_converted",
  "save_converted",
  "sniff",
  "to_flax",
  "to_keras_checkpoint",
  "trainable_mask",
  "write",
]

_ZIP, _HDF5 = b"PK\x03\x04", b"\x89HDF\r\n\x1a\n"
_BUNDLE_MAGIC = bytes.fromhex("57fb808b247547db")  # 0xdb4775248b80fb57, little-endian.


def _is_bundle_index(path: Path) -> bool:
  if not path.is_file() or path.stat().st_size < 48:
    return False
  with open(path, "rb") as f:
    f.seek(-8, os.SEEK_END)
    return f.read(8) == _BUNDLE_MAGIC


def sniff(path: str | os.PathLike) -> str:
  """The checkpoint format at ``path``, judged by content (magic numbers, layout), not name.

  Returns one of ``"keras"``, ``"weights.h5"``, ``"tf-keras-h5"``, ``"weights.json"``,
  ``"tf-checkpoint"``, ``"savedmodel"``, ``"orbax-callback"``, ``"adamjax"`` (a directory written
  by :func:`save_converted`).

  Raises:
    ConversionError: if ``path`` does not exist or is none of these.
  """
  path = Path(path)
  if path.is_dir():
    if (path / "adamjax_convert.json").is_file():
      return "adamjax"
    if (path / "saved_model.pb").is_file() or (path / "saved_model.pbtxt").is_file():
      return "savedmodel"
    if (path / "checkpoint").is_file() or any(_is_bundle_index(p) for p in path.glob("*.index")):
      return "tf-checkpoint"
    if any(p.name == "_CHECKPOINT_METADATA" for p in path.rglob("_CHECKPOINT_METADATA")):
      return "orbax-callback"
    raise ConversionError(
      f"{path} is a directory with no checkpoint format the converter "
      "knows (SavedModel, TF checkpoint, Orbax)"
    )
  if _is_bundle_index(path) or _is_bundle_index(Path(f"{path}.index")):
    return "tf-checkpoint"
  if not path.is_file():
    raise ConversionError(f"{path} does not exist")
  with open(path, "rb") as f:
    head = f.read(8)
  if head.startswith(_ZIP):
    return "keras"
  if head == _HDF5:
    from adamjax.convert._safe_io import H5_ERRORS, _h5py, clip

    h5py = _h5py()
    try:
      with h5py.File(path, "r") as f:
        legacy = "model_weights" in f or "layer_names" in f.attrs
    except H5_ERRORS as e:
      raise ConversionError(
        f"{path}: not a readable HDF5 file ({type(e).__name__}: {clip(str(e), 200)})"
      ) from None
    return "tf-keras-h5" if legacy else "weights.h5"
  if head.lstrip().startswith(b"{"):
    return "weights.json"
  raise ConversionError(
    f"{path}: not a Keras, HDF5, TensorBundle or JSON file (starts with {head!r})"
  )


def read(
  path: str | os.PathLike,
  *,
  model_config: dict[str, Any] | None = None,
  max_bytes: int | None = None,
) -> KerasCheckpoint:
  """Reads a Keras/TF checkpoint as data (see :func:`sniff` for the formats).

  Args:
    path: A file, a TF checkpoint prefix or directory, a SavedModel or Orbax directory.
    model_config: A Keras model config (``config.json`` contents), for a bare ``.weights.h5``
      whose layers the converter cannot otherwise tell apart (e.g. a frozen layer).
    max_bytes: Cap on the bytes the file's arrays decode to, checked before anything is
      allocated (default 4 GiB; raise it for a bigger model). Orbax directories are read by
      orbax-checkpoint and not capped.

  Raises:
    ConversionError: if the file is malformed, unsafe, or holds something unsupported; the
      message names the entry and the reason.
  """
  source = os.fspath(path)
  try:
    ckpt = _read(path, model_config, max_bytes)
  except ConversionError as e:
    if source in str(e):
      raise
    raise ConversionError(f"{source}: {e}") from None
  ckpt.source = source
  return ckpt


def _read(
  path: str | os.PathLike, model_config: dict[str, Any] | None, max_bytes: int | None
) -> KerasCheckpoint:
  fmt = sniff(path)
  limits = {} if max_bytes is None else {"max_bytes": max_bytes}
  if fmt in ("keras", "weights.h5", "weights.json", "tf-keras-h5"):
    from adamjax.convert import _keras_h5

    if fmt == "keras":
      return _keras_h5.read_keras_archive(path, **limits)
    if fmt == "weights.h5":
      return _keras_h5.read_keras_weights_h5(path, model_config=model_config, **limits)
    if fmt == "weights.json":
      return _keras_h5.read_keras_weights_json(path, model_config=model_config, **limits)
    return _keras_h5.read_tf_keras_h5(path, **limits)
  if fmt == "adamjax":
    from adamjax.convert import _orbax

    tree, meta = restore_converted(path)
    like = _orbax.template(meta)
    config = meta.get("model_config")
    if config is not None:  # Data from a file: checked again, as any config.
      from adamjax.convert import _keras_config

      _keras_config.check_config(config, f"{path} (model_config)")
    ckpt = to_keras_checkpoint(
      tree, like.layers, optimizer=like.optimizer, model_config=config, fmt="adamjax"
    )
    ckpt.dropped_optimizer = like.dropped_optimizer
    return ckpt
  from adamjax.convert import _tf_checkpoint

  if fmt == "savedmodel":
    return _tf_checkpoint.read_savedmodel(path, **limits)
  if fmt == "orbax-callback":
    return _tf_checkpoint.read_orbax_callback(path)
  return _tf_checkpoint.read_tf_checkpoint(path, **limits)


def write(
  ckpt: KerasCheckpoint, path: str | os.PathLike, *, model_config: dict[str, Any] | None = None
) -> None:
  """Writes ``ckpt`` as ``.keras`` (if ``path`` ends so) or Keras 3 ``.weights.h5``.

  ``.keras`` needs the model's Keras config: ``model_config`` or ``ckpt.model_config``.
  A ``.weights.h5`` carries no config; Keras loads its optimizer state only into a built
  optimizer: ``model.optimizer.build(model.trainable_variables)`` before ``load_weights``.
  """
  from adamjax.convert import _keras_h5

  if str(path).endswith(".keras"):
    _keras_h5.write_keras_archive(ckpt, path, model_config=model_config)
  elif str(path).endswith(".weights.h5"):
    _keras_h5.write_keras_weights_h5(ckpt, path)
  else:
    raise ConversionError(f"{path}: the output name must end in .keras or .weights.h5")


def flax_model(
  source: str | os.PathLike | KerasCheckpoint,
  *,
  model_config: dict[str, Any] | None = None,
  max_bytes: int | None = None,
):
  """The Keras model in a file as an ``nnx.Module``, built from its config, with its weights.

  Every layer is built by the layer registry (:mod:`adamjax.convert.layers`) and computes what
  Keras computes; the module's attributes are Keras's layer names (``dense``, ``lstm_1``, nested
  models as nested modules), so :func:`adam_state` and :func:`to_flax` map the checkpoint onto
  ``nnx.state(model, nnx.Param)`` one to one::

      model = adamjax.convert.flax_model("model.keras")
      logits = model(x)                                # model(x, training=True, rngs=rngs)
      ckpt = adamjax.convert.read("model.keras")
      tx = adamjax.convert.keras_optimizer(ckpt)
      opt_state = adamjax.convert.adam_state(ckpt, tx, nnx.to_pure_dict(nnx.state(model, nnx.Param)))

  A training step differentiates the parameters and lets BatchNorm update its statistics, as
  Keras's ``fit`` does (``model.losses()`` are the weight penalties; ``model.run`` also returns
  the activity penalties; ``model.apply_constraints()`` after the update)::

      graphdef, params, rest = nnx.split(model, nnx.Param, ...)

      def loss_fn(params, rest, x, y, key):
        m = nnx.merge(graphdef, params, rest, copy=True)  # copy: BatchNorm writes its stats
        out, _, activity = m.run([x], None, training=True, rngs=nnx.Rngs(dropout=key))
        loss = compiled_loss(y, out) + sum(m.losses()) + sum(activity)
        return loss, nnx.state(m, nnx.BatchStat)

  Args:
    source: A checkpoint path (see :func:`read`) or a :class:`KerasCheckpoint` already read.
    model_config: The model's Keras config (``config.json`` contents), for formats that store
      none (``.weights.h5``, TF checkpoints); a ``.keras`` or tf-keras ``.h5`` has its own.
    max_bytes: As in :func:`read`.

  Raises:
    ConversionError: if there is no config, the config uses layers the registry does not
      build (all are listed, with their paths), or the weights do not fit the config (the
      model is traced once on the config's input shapes, without computing anything).
  """
  from adamjax.convert import _graph

  if isinstance(source, KerasCheckpoint):
    ckpt = source
  else:
    ckpt = read(source, model_config=model_config, max_bytes=max_bytes)
  config = model_config if model_config is not None else ckpt.model_config
  where = ckpt.source or f"the {ckpt.format} checkpoint"
  if config is None:
    raise ConversionError(
      f"{where}: a {ckpt.format} file stores no model config; pass model_config "
      "(the model's config.json, or model.get_config() wrapped as "
      '{"class_name": ..., "config": ...})'
    )
  if model_config is not None:
    from adamjax.convert import _keras_config

    _keras_config.check_config(model_config, f"{where} (model_config)")
  weights = {layer.name: layer.weights for layer in ckpt.layers}
  model = _graph.KerasModel(config, weights, source=where)
  _graph.check_call(model, config, where)
  return model
