"""Keras variables and Adam state onto a Flax model and an adamjax optimizer, and back.

The mapping is by name: a Keras layer maps to the Flax module of the same name (Keras's
class-based names, ``dense``, ``dense_1``, ``batch_normalization``; ``layer_map`` renames), and each
Keras variable to the Flax variable its layer class calls it (:data:`FLAX_NAMES`). Nothing is
matched by flattened position. Every mapped tree is checked against the target's own tree
(missing, unexpected, mis-shaped and wrongly typed entries are all reported together).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
import optax

import adamjax
from adamjax.convert._ir import ConversionError, KerasAdamState, KerasCheckpoint, KerasLayer
from adamjax.convert._safe_io import clip
from adamjax.convert.layers import LAYERS


def _flax_names() -> dict[str, dict[str, str]]:
  names = {}
  for class_name, cls in LAYERS.items():
    try:
      variables = cls.variables({})
    except (ConversionError, ValueError, TypeError, KeyError):
      continue  # a class whose variables depend on options it has no default for
    if variables:
      names[class_name] = {v: cls.flax_names.get(v, v) for v in variables}
  return names


# Keras variable name -> Flax (NNX and Linen) variable name, per Keras layer class with its
# default options (from the layer registry: Flax's own names where Flax has the layer, e.g.
# BatchNormalization's ``gamma`` is ``scale``; Keras's names otherwise). Dense and Conv kernels
# have the same layout in both (Dense (in, out), Conv HWIO): no transposes.
FLAX_NAMES: dict[str, dict[str, str]] = _flax_names()

Path = tuple[str, ...]

# Keras Adam/AdamW config keys and what adamjax.keras_adam does with them.
_ADAM_ARGS = (
  "beta_1",
  "beta_2",
  "epsilon",
  "amsgrad",
  "weight_decay",
  "clipnorm",
  "clipvalue",
  "global_clipnorm",
)
_REFUSED_OPTIONS = {
  "use_ema": "its moving averages are separate optimizer variables the converter does not map",
  "gradient_accumulation_steps": "its accumulators are mid-cycle optimizer variables the "
  "converter does not map",
  "loss_scale_factor": "a loss scale is not part of the Adam state",
}
_IGNORED_KEYS = {"name", "learning_rate", "ema_momentum", "ema_overwrite_frequency"}


def _layer_path(name: str, layer_map: Mapping[str, str] | None) -> Path:
  return tuple((layer_map or {}).get(name, name).split("/"))


def variable_paths(
  layers: list[KerasLayer], layer_map: Mapping[str, str] | None = None
) -> dict[tuple[str, str], Path]:
  """``(layer, keras variable)`` -> path of the Flax variable it maps to.

  Raises:
    ConversionError: for a layer class or variable that has no Flax counterpart.
  """
  from adamjax.convert.layers import LAYERS

  paths = {}
  for layer in layers:
    cls = LAYERS.get(layer.class_name)
    if cls is None:
      raise ConversionError(
        f"layer {clip(layer.name)}: Keras class {layer.class_name} has no "
        f"Flax mapping (supported: {sorted(LAYERS)})"
      )
    known = set(cls.variables(layer.config or {})) | set(cls.flax_names)
    for var in layer.weights:
      if var not in known:
        raise ConversionError(
          f"layer {clip(layer.name)} ({layer.class_name}) has a variable "
          f"{clip(var)} that Keras's {layer.class_name} does not have"
        )
      flax_name = cls.flax_names.get(var, var)
      paths[layer.name, var] = _layer_path(layer.name, layer_map) + tuple(flax_name.split("/"))
  return paths


def _flatten(tree: Any) -> dict[Path, Any]:
  leaves = jax.tree_util.tree_leaves_with_path(
    tree, is_leaf=lambda x: isinstance(x, optax.MaskedNode)
  )
  return {_keys(path): leaf for path, leaf in leaves}


def _shape_dtype(x: Any) -> tuple[tuple[int, ...], np.dtype]:
  return tuple(np.shape(x)), np.dtype(x.dtype)


def _fill(target: Any, values: dict[Path, np.ndarray], what: str, *, source: str) -> Any:
  """``target``'s tree with each leaf replaced by ``values[path]``; every mismatch reported."""
  flat = _flatten(target)
  problems = []
  for path in values:
    if path not in flat:
      problems.append(f"unexpected: {source} has {'/'.join(path)}, the target has no such {what}")
  for path, leaf in flat.items():
    if isinstance(leaf, optax.MaskedNode):
      continue
    if path not in values:
      problems.append(f"missing: the target's {'/'.join(path)} is not in {source}")
      continue
    (shape, dtype), value = _shape_dtype(leaf), values[path]
    if value.shape != shape:
      problems.append(
        f"mis-shaped: {'/'.join(path)} is {value.shape} in {source}, {shape} in the target"
      )
    elif value.dtype != dtype:
      problems.append(
        f"wrong dtype: {'/'.join(path)} is {value.dtype} in {source}, {dtype} in the target"
      )
  if problems:
    raise ConversionError(f"the {what}s do not match the target model:\n  " + "\n  ".join(problems))
  return jax.tree_util.tree_map_with_path(
    lambda path, leaf: leaf if isinstance(leaf, optax.MaskedNode) else values[_keys(path)],
    target,
    is_leaf=lambda x: isinstance(x, optax.MaskedNode),
  )


def _keys(path: Any) -> Path:
  return tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def to_flax(
  ckpt: KerasCheckpoint, target: Any, *, layer_map: Mapping[str, str] | None = None
) -> Any:
  """Keras's variables as a tree shaped like ``target``.

  Args:
    ckpt: What a reader returned.
    target: The Flax model's variables as nested dicts, e.g.
      ``nnx.to_pure_dict(nnx.state(model))`` (parameters and batch statistics together) or
      ``nnx.to_pure_dict(nnx.state(model, nnx.Param))``; arrays or ``jax.ShapeDtypeStruct``.
    layer_map: Keras layer name -> '/'-joined Flax module path, for modules named differently.

  Returns:
    ``target``'s tree holding the checkpoint's NumPy arrays.

  Raises:
    ConversionError: listing every target variable the checkpoint lacks, every checkpoint
      variable the target lacks, and every shape or dtype that differs.
  """
  paths = variable_paths(ckpt.layers, layer_map)
  values = {
    paths[layer.name, var]: np.asarray(value)
    for layer in ckpt.layers
    for var, value in layer.weights.items()
  }
  return _fill(target, values, "variable", source=f"the {ckpt.format} checkpoint")


def from_flax(
  variables: Any, layers: list[KerasLayer], *, layer_map: Mapping[str, str] | None = None
) -> list[KerasLayer]:
  """Flax variables back into Keras layers, shaped and named as ``layers`` (a template).

  Raises:
    ConversionError: if a variable of the template is missing from ``variables`` or differs in
      shape or dtype.
  """
  flat, paths = _flatten(variables), variable_paths(layers, layer_map)
  out, problems = [], []
  for layer in layers:
    weights = {}
    for var, like in layer.weights.items():
      path = paths[layer.name, var]
      if path not in flat:
        problems.append(f"missing: {'/'.join(path)} (Keras {layer.name}/{var})")
        continue
      value = np.asarray(flat[path])
      if value.shape != like.shape or value.dtype != like.dtype:
        problems.append(
          f"mis-shaped: {'/'.join(path)} is {value.dtype}{list(value.shape)}"
          f", Keras {layer.name}/{var} is {like.dtype}{list(like.shape)}"
        )
      weights[var] = value
    out.append(KerasLayer(layer.name, layer.class_name, weights, layer.trainable, layer.config))
  if problems:
    raise ConversionError(
      "the Flax variables do not match the Keras layers:\n  " + "\n  ".join(problems)
    )
  return out


def keras_optimizer(ckpt: KerasCheckpoint) -> optax.GradientTransformation:
  """The adamjax transformation that continues ``ckpt``'s Keras Adam exactly.

  ``adamjax.keras_adam`` with the checkpoint's ``learning_rate`` (the stored float32 value),
  ``beta_1``, ``beta_2``, ``epsilon``, ``amsgrad``, weight decay and clipping; Keras's defaults
  for anything the format does not store (TF checkpoints keep no optimizer config).

  Raises:
    ConversionError: for state the converter cannot carry over exactly: no optimizer in the
      checkpoint, a learning-rate schedule, EMA, gradient accumulation, a loss scale, an
      unknown option.
  """
  opt = _require_optimizer(ckpt)
  check_optimizer_config(opt, ckpt.source or f"the {ckpt.format} checkpoint")
  config = dict(opt.config)
  for key, why in _REFUSED_OPTIONS.items():
    if config.get(key) not in (None, False, 0):
      raise ConversionError(
        f"the checkpoint's {opt.class_name} has {key}={clip(config[key])}, "
        f"which the converter cannot carry over exactly: {why}"
      )
  unknown = sorted(set(config) - set(_ADAM_ARGS) - set(_REFUSED_OPTIONS) - _IGNORED_KEYS)
  if unknown:
    raise ConversionError(
      f"the checkpoint's {opt.class_name} config has options the converter does not know: {unknown}"
    )
  lr = config.get("learning_rate")
  if isinstance(lr, dict):
    raise ConversionError(
      f"the checkpoint's learning rate is a schedule ({lr.get('class_name', lr)}); the "
      "converter carries over only a constant learning rate (continuing with a schedule "
      "it does not reproduce exactly would silently change every step)"
    )
  if opt.learning_rate is not None:
    lr = opt.learning_rate
  if lr is None:
    raise ConversionError(f"the {ckpt.format} checkpoint stores no learning rate")
  learning_rate = float(lr)
  kwargs = {k: config[k] for k in _ADAM_ARGS if config.get(k) is not None}
  if opt.class_name == "AdamW":
    return adamjax.keras_adamw(learning_rate, **kwargs)
  if opt.class_name != "Adam":
    raise ConversionError(
      f"the checkpoint's optimizer is {opt.class_name}; only Keras Adam and AdamW are supported"
    )
  return adamjax.keras_adam(learning_rate, **kwargs)


# Each numeric Adam setting: (lowest, highest, whether the bounds themselves are allowed). Betas
# of 1 would divide by zero in the bias correction; Keras does not check, so the file may not.
_RANGES = {
  "beta_1": (0.0, 1.0, (True, False)),
  "beta_2": (0.0, 1.0, (True, False)),
  "epsilon": (0.0, math.inf, (True, False)),
  "weight_decay": (0.0, math.inf, (True, False)),
  "clipnorm": (0.0, math.inf, (False, False)),
  "clipvalue": (0.0, math.inf, (False, False)),
  "global_clipnorm": (0.0, math.inf, (False, False)),
  "learning_rate": (0.0, math.inf, (True, False)),
}


def check_optimizer_config(opt: KerasAdamState, where: str) -> None:
  """The optimizer's settings are numbers in range (``amsgrad`` a boolean), or absent.

  A schedule (a dict) for ``learning_rate`` is left to :func:`keras_optimizer` to refuse.

  Raises:
    ConversionError: naming the setting and its value.
  """
  config = opt.config
  if not isinstance(config, dict):
    raise ConversionError(f"{where}: the optimizer config is not a JSON object")
  for key, (low, high, (low_ok, high_ok)) in _RANGES.items():
    value = config.get(key)
    if value is None or (key == "learning_rate" and isinstance(value, dict)):
      continue
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok:
      ok = (low < value or (low_ok and value == low)) and (
        value < high or (high_ok and value == high)
      )
    if not ok:
      raise ConversionError(
        f"{where}: optimizer setting {key} = {clip(value)} is not a number in "
        f"{'[' if low_ok else '('}{low}, {high}{']' if high_ok else ')'}"
      )
  if config.get("amsgrad") not in (None, True, False):
    raise ConversionError(
      f"{where}: optimizer setting amsgrad = {clip(config['amsgrad'])} is not a boolean"
    )


def _require_optimizer(ckpt: KerasCheckpoint) -> KerasAdamState:
  if ckpt.optimizer is None:
    raise ConversionError(
      f"the {ckpt.format} checkpoint holds no optimizer state"
      + (f" ({'; '.join(ckpt.notes)})" if ckpt.notes else "")
    )
  return ckpt.optimizer


def _map_states(state: Any, fn: Callable[[Any], Any]) -> Any:
  """Rebuilds an optax state tree, replacing the NamedTuples ``fn`` handles (others recursed)."""
  if isinstance(state, tuple) and hasattr(state, "_fields"):
    replaced = fn(state)
    if replaced is not None:
      return replaced
    return type(state)(*(_map_states(s, fn) for s in state))
  if isinstance(state, (tuple, list)):
    return type(state)(_map_states(s, fn) for s in state)
  if isinstance(state, dict):  # e.g. optax.multi_transform's inner states, by label.
    return {k: _map_states(v, fn) for k, v in state.items()}
  return state


def adam_state(
  ckpt: KerasCheckpoint,
  tx: optax.GradientTransformation,
  params: Any,
  *,
  layer_map: Mapping[str, str] | None = None,
) -> optax.OptState:
  """``tx.init(params)`` with Keras's Adam slots and iteration count filled in.

  ``tx`` is ``keras_optimizer(ckpt)`` (exact), or any chain around ``adamjax.keras_adam``,
  ``optax.masked`` included (a masked-out leaf must be one Keras keeps no slot for: a frozen
  layer). ``optax.adam`` is accepted too, for comparisons, with the same slots: its update is
  not Keras's, so it does not continue the run exactly.

  Args:
    ckpt: A checkpoint with optimizer state.
    tx: The transformation whose state to build.
    params: The trainable parameters (nested dicts; arrays or ``ShapeDtypeStruct``s).
    layer_map: As in :func:`to_flax`.

  Returns:
    The optimizer state: every moment from Keras, every step counter at Keras's ``iterations``.

  Raises:
    ConversionError: if a slot has no parameter, a parameter the optimizer updates has no slot,
      a shape differs, ``iterations`` does not fit int32, or ``tx`` has state the converter
      does not know how to fill (it says which).
  """
  opt = _require_optimizer(ckpt)
  if not 0 <= opt.iterations < 2**31:
    raise ConversionError(f"iterations={opt.iterations} does not fit adamjax's int32 count")
  count = np.int32(opt.iterations)
  paths = variable_paths(ckpt.layers, layer_map)
  source = f"the {ckpt.format} checkpoint's Adam slots"

  def slots(named: dict[tuple[str, str], np.ndarray], like: Any, what: str) -> Any:
    values = {}
    for key, value in named.items():
      if key not in paths:
        raise ConversionError(
          f"{what} slot for {key[0]}/{key[1]}, a variable the checkpoint's layers do not have"
        )
      values[paths[key]] = np.asarray(value)
    return _fill(like, values, f"{what} slot", source=source)

  def fill(s: Any) -> Any:
    if isinstance(s, (adamjax.ScaleByKerasAdamState, optax.ScaleByAdamState)):
      fields = dict(
        count=count,
        mu=slots(opt.momentums, s.mu, "momentum"),
        nu=slots(opt.velocities, s.nu, "velocity"),
      )
      if isinstance(s, adamjax.ScaleByKerasAdamState):
        if (s.nu_max is None) != (not opt.velocity_hats):
          raise ConversionError(
            f"the checkpoint's amsgrad={bool(opt.velocity_hats)} but the optimizer's "
            f"amsgrad={s.nu_max is not None}"
          )
        fields["nu_max"] = (
          None if s.nu_max is None else slots(opt.velocity_hats, s.nu_max, "velocity_hat")
        )
      return type(s)(**fields)
    if isinstance(s, (adamjax.KerasWeightDecayState,) + _clip_states()):
      return type(s)(step=count)  # 0-based step counters, as Keras's iterations.
    if isinstance(s, optax.ScaleByScheduleState):
      return type(s)(count=count)
    if isinstance(s, (optax.EmptyState, optax.MaskedState)) or not jax.tree.leaves(s):
      return None
    if type(s).__name__ in (
      "InjectHyperparamsState",
      "InjectStatefulHyperparamsState",
      "PartitionState",
      "MultiTransformState",
    ):
      return None  # Wrappers: their inner states are filled (the counts below).
    raise ConversionError(
      f"the optimizer has a {type(s).__name__} state the converter does "
      "not know how to fill from a Keras checkpoint"
    )

  state = _map_states(tx.init(params), fill)
  return _map_states(
    state,
    lambda s: (
      s._replace(count=count)
      if type(s).__name__ in ("InjectHyperparamsState", "InjectStatefulHyperparamsState")
      else None
    ),
  )


def _clip_states() -> tuple[type, ...]:
  from adamjax._keras_clip import KerasClipState

  return (KerasClipState,)


def _adam_states(state: Any):
  """The Adam states in an optimizer state, as dicts; also in one Orbax restored untyped
  (where each NamedTuple became a dict of its fields)."""
  if isinstance(state, (adamjax.ScaleByKerasAdamState, optax.ScaleByAdamState)):
    yield state._asdict()
  elif isinstance(state, dict) and {"count", "mu", "nu"} <= set(state):
    yield state
  elif isinstance(state, dict):
    for value in state.values():
      yield from _adam_states(value)
  elif isinstance(state, (tuple, list)):
    for value in state:
      yield from _adam_states(value)


def keras_adam_state(
  opt_state: optax.OptState,
  params: Any,
  layers: list[KerasLayer],
  *,
  class_name: str = "Adam",
  config: Mapping[str, Any] | None = None,
  learning_rate: float | None = None,
  layer_map: Mapping[str, str] | None = None,
) -> KerasAdamState:
  """The reverse of :func:`adam_state`: an adamjax Keras-Adam state as Keras's optimizer variables.

  Args:
    opt_state: A state holding one ``ScaleByKerasAdamState`` (or ``optax.ScaleByAdamState``),
      typed or as Orbax restores it without a target (dicts of the fields).
    params: The parameters it belongs to (for the tree paths only).
    layers: The Keras layers (a template: names, classes, trainable variables).
    class_name, config: Keras's optimizer class and config to record.
    learning_rate: The learning rate Keras should store (float32); None if a schedule.
    layer_map: As in :func:`to_flax`.

  Raises:
    ConversionError: if the state has no (or more than one) Adam state, or a trainable Keras
      variable has no moment in it.
  """
  del params
  found = list(_adam_states(opt_state))
  if len(found) != 1:
    raise ConversionError(f"expected one Adam state in the optimizer state, found {len(found)}")
  (s,) = found
  paths = variable_paths(layers, layer_map)
  mu, nu = _flatten(s["mu"]), _flatten(s["nu"])
  nu_max = _flatten(s["nu_max"]) if s.get("nu_max") is not None else {}
  momentums, velocities, hats, problems = {}, {}, {}, []
  for layer in layers:
    for var in layer.trainable:
      path = paths[layer.name, var]
      if path not in mu or isinstance(mu[path], optax.MaskedNode):
        problems.append(f"{layer.name}/{var} (Flax {'/'.join(path)})")
        continue
      momentums[layer.name, var] = np.asarray(mu[path])
      velocities[layer.name, var] = np.asarray(nu[path])
      if nu_max:
        hats[layer.name, var] = np.asarray(nu_max[path])
  if problems:
    raise ConversionError(
      "trainable Keras variables without Adam moments in the optimizer "
      "state: " + ", ".join(problems)
    )
  return KerasAdamState(
    class_name=class_name,
    config=dict(config or {}),
    iterations=int(np.asarray(s["count"])),
    learning_rate=None if learning_rate is None else np.float32(learning_rate),
    momentums=momentums,
    velocities=velocities,
    velocity_hats=hats,
  )
