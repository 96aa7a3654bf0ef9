"""A Keras model config as an NNX module: Sequential and Functional graphs over the layer registry.

:class:`KerasModel` is built from a checked config (``config.json``, or a tf-keras ``model_config``)
and the file's arrays. Each Keras layer becomes an attribute named as the converter names it
(Keras's class-based names, ``dense``, ``dense_1``; nested models are nested modules), so the
module's state paths are the checkpoint's layer paths and weights and Adam slots map 1:1.

Calling it runs the graph as ``keras/src/models/functional.py`` does: every node of the config in
order of its inputs, masks carried from layer to layer (``keras/src/layers/layer.py``
``__call__``: one tensor argument gets ``mask=``, several get ``<name>_mask=``; only layers that
support masking pass a mask on), floating inputs cast to each layer's compute dtype (mixed
precision), and a node's own ``training`` argument (``base(x, training=False)``) overriding the
model's. Nothing from the config is executed: it is data walked by this module.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
import sys
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from adamjax.convert._ir import ConversionError, class_layer_names
from adamjax.convert._safe_io import clip
from adamjax.convert.layers import LAYERS, OPS, _regularizers

MODELS = frozenset({"Sequential", "Functional", "Model"})


def is_operation(entry: dict[str, Any]) -> bool:
  """Whether a config entry is a ``keras.ops`` node (``keras.src.ops.numpy.Mean``...)."""
  module = entry.get("module")
  return isinstance(module, str) and module.startswith("keras.src.ops.")


_MAX_NODES = 100_000


def unsupported_layers(config: Any, prefix: str = "") -> list[str]:
  """``"path (ClassName)"`` for every layer of a (checked) model config the registry lacks."""
  found = []
  inner = config.get("config") if isinstance(config, dict) else None
  entries = inner.get("layers") if isinstance(inner, dict) else None
  if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
    return found  # KerasModel refuses the malformed model itself
  for entry, name in zip(entries, _names(config), strict=True):
    class_name = entry.get("class_name")
    if is_operation(entry):
      if (entry.get("module"), class_name) not in OPS:
        found.append(f"{prefix}{name} ({clip(entry.get('module'), 40)}.{clip(class_name, 40)})")
    elif class_name in MODELS:
      found += unsupported_layers(entry, f"{prefix}{name}/")
    elif class_name != "InputLayer" and class_name not in LAYERS:
      found.append(f"{prefix}{name} ({clip(class_name, 60)})")
  return found


def _names(config: dict[str, Any]) -> list[str | None]:
  """The converter's name of each entry of ``config.layers`` (None for a Sequential's input):
  Keras's class-based names for layers; ``op<i>`` for operations, which Keras does not save
  and which therefore do not count in the class-based names."""
  entries = config["config"]["layers"]
  skip = (
    config["class_name"] == "Sequential"
    and entries
    and entries[0].get("class_name") == ("InputLayer")
  )
  kept = [e for e in entries[1 if skip else 0 :] if not is_operation(e)]
  names = iter(class_layer_names([e.get("class_name") for e in kept]))
  out = [None] if skip else []
  for i, entry in enumerate(entries[1 if skip else 0 :]):
    out.append(f"op{i}" if is_operation(entry) else next(names))
  return out


def _freeze(x: Any) -> Any:
  """JSON data as hashable tuples (static module attributes must be hashable)."""
  if isinstance(x, dict):
    return ("__dict__", tuple((k, _freeze(v)) for k, v in x.items()))
  if isinstance(x, list):
    return tuple(_freeze(v) for v in x)
  return x


def _thaw(x: Any) -> Any:
  if isinstance(x, tuple) and x[:1] == ("__dict__",):
    return {k: _thaw(v) for k, v in x[1]}
  if isinstance(x, tuple):
    return [_thaw(v) for v in x]
  return x


@dataclasses.dataclass(frozen=True)
class _Ref:
  """A Keras tensor in a node's arguments: output ``tensor`` of node ``node`` of ``layer``."""

  layer: str
  node: int
  tensor: int


def _refs(x: Any, where: str) -> Any:
  """A node's ``args``/``kwargs`` with each ``__keras_tensor__`` (Keras 3) replaced by a _Ref."""
  if isinstance(x, dict) and x.get("class_name") == "__keras_tensor__":
    config = x.get("config")
    history = config.get("keras_history") if isinstance(config, dict) else None
    if (
      not isinstance(history, list)
      or len(history) != 3
      or not isinstance(history[0], str)
      or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in history[1:])
    ):
      raise ConversionError(f"{where}: a Keras tensor with keras_history {clip(history)}")
    return _Ref(*history)
  if isinstance(x, dict):
    return {k: _refs(v, where) for k, v in x.items()}
  if isinstance(x, list):
    return [_refs(v, where) for v in x]
  return x


def _legacy_refs(x: Any) -> Any:
  """tf-keras writes tensors in a node's kwargs as ``[layer, node, tensor]`` lists."""
  if (
    isinstance(x, list)
    and len(x) == 3
    and isinstance(x[0], str)
    and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in x[1:])
  ):
    return _Ref(*x)
  if isinstance(x, list):
    return [_legacy_refs(v) for v in x]
  if isinstance(x, dict):
    return {k: _legacy_refs(v) for k, v in x.items()}
  return x


def _nodes(entry: dict[str, Any], where: str) -> list[tuple[Any, dict[str, Any]]]:
  """A layer's inbound nodes as ``(args, kwargs)`` with _Refs: Keras 3's ``{"args", "kwargs"}``
  or tf-keras's ``[[layer, node, tensor, kwargs], ...]`` (one positional argument per node:
  the tensor, or the list of tensors)."""
  nodes = entry.get("inbound_nodes") or []
  if not isinstance(nodes, list):
    raise ConversionError(f"{where}.inbound_nodes is not a list")
  out = []
  for i, node in enumerate(nodes):
    here = f"{where}.inbound_nodes[{i}]"
    if isinstance(node, dict):
      args, kwargs = _refs(node.get("args", []), here), _refs(node.get("kwargs") or {}, here)
      if not isinstance(args, list) or not isinstance(kwargs, dict):
        raise ConversionError(f"{here} is not {{args: [...], kwargs: {{...}}}}")
      out.append((args, kwargs))
      continue
    if not isinstance(node, list) or not node:
      raise ConversionError(f"{here} is not a Keras node")
    refs, kwargs = [], {}
    for item in node:
      if not (
        isinstance(item, list)
        and len(item) in (3, 4)
        and isinstance(item[0], str)
        and all(isinstance(k, int) and not isinstance(k, bool) and k >= 0 for k in item[1:3])
      ):
        raise ConversionError(f"{here}: {clip(item)} is not [layer, node, tensor, kwargs]")
      refs.append(_Ref(*item[:3]))
      if len(item) == 4 and isinstance(item[3], dict):
        kwargs = {k: _legacy_refs(v) for k, v in item[3].items()}
    out.append(([refs[0] if len(refs) == 1 else refs], kwargs))
  return out


def _io_refs(value: Any, where: str) -> list[_Ref]:
  """``input_layers``/``output_layers``: one ``[name, node, tensor]`` or a list (or dict) of them."""
  if isinstance(value, dict):
    value = list(value.values())
  if isinstance(value, list) and value and isinstance(value[0], str):
    value = [value]
  if not isinstance(value, list) or not value:
    raise ConversionError(f"{where} is not a list of [layer, node, tensor]")
  refs = []
  for item in value:
    if not (
      isinstance(item, list)
      and len(item) == 3
      and isinstance(item[0], str)
      and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in item[1:])
    ):
      raise ConversionError(f"{where}: {clip(item)} is not [layer, node, tensor]")
    refs.append(_Ref(*item))
  return refs


@dataclasses.dataclass(frozen=True)
class _Graph:
  """The static part of a model: which attribute runs which node on what.

  ``steps`` is ``(attribute, node index, frozen args, frozen kwargs)`` for every node, in an
  order where each node's inputs come first; ``inputs``/``outputs`` are (layer, node, tensor).
  """

  sequential: bool
  inputs: tuple[tuple[str, int, int], ...]
  input_dtypes: tuple[str | None, ...]
  outputs: tuple[tuple[str, int, int], ...]
  output_keys: tuple[str, ...] | None
  steps: tuple[tuple[str, str, int, Any, Any], ...]
  attributes: tuple[str, ...]


def _flatten_refs(x: Any) -> list[_Ref]:
  if isinstance(x, _Ref):
    return [x]
  if isinstance(x, dict):
    return [r for v in x.values() for r in _flatten_refs(v)]
  if isinstance(x, list):
    return [r for v in x for r in _flatten_refs(v)]
  return []


class LayerCallError(ValueError):
  """A layer of a built model failed on its inputs; the message names the layer."""


# The build-time trace is skipped for declared inputs larger than this (a hostile config could
# otherwise make layers that loop in Python over a dimension, unrolled RNNs, run for long).
_MAX_TRACED_DIM = 8192
_MAX_TRACED_ELEMENTS = 1 << 28


def input_specs(model: KerasModel, config: dict[str, Any]) -> list[jax.ShapeDtypeStruct] | None:
  """The model's inputs as the config declares them, in the model's input order (unknown sizes
  taken as 2), or None when the config does not say (a Sequential built without an ``Input``)
  or declares sizes too large to trace cheaply."""
  entries = [e for e in config["config"]["layers"] if e.get("class_name") == "InputLayer"]
  by_name = {e.get("name", e["config"].get("name")): e for e in entries}
  if model.graph.sequential:
    inputs = entries[:1]
  else:
    inputs = [by_name[name] for name, _, _ in model.graph.inputs]
  if not inputs:
    return None
  specs = []
  for entry in inputs:
    layer_config = entry["config"]
    shape = layer_config.get("batch_shape", layer_config.get("batch_input_shape"))
    dtype = layer_config.get("dtype", "float32")
    if isinstance(dtype, dict):
      policy = dtype.get("config")
      dtype = policy.get("name", "float32") if isinstance(policy, dict) else None
    if not isinstance(shape, list) or not all(
      d is None or (isinstance(d, int) and not isinstance(d, bool) and 0 < d <= _MAX_TRACED_DIM)
      for d in shape
    ):
      return None
    if dtype not in ("float16", "bfloat16", "float32", "float64", "int32", "int64", "bool"):
      return None
    dims = tuple(2 if d is None else d for d in shape)
    if math.prod(dims) > _MAX_TRACED_ELEMENTS:
      return None
    specs.append(jax.ShapeDtypeStruct(dims, dtype))
  return specs


def check_call(model: KerasModel, config: dict[str, Any], source: str) -> None:
  """Traces the model on the config's input shapes (``jax.eval_shape``: nothing is computed or
  allocated), so a config whose layers do not fit together, or do not fit the weights, is
  refused when the model is built, naming the layer, not when it is first called."""
  specs = input_specs(model, config)
  if specs is None:
    return
  graphdef, state = nnx.split(model)
  try:
    jax.eval_shape(lambda s, *x: nnx.merge(graphdef, s)(*x), state, *specs)
  except LayerCallError as e:
    raise ConversionError(f"{source}: the model does not run on its declared inputs: {e}") from None
  except Exception as e:  # noqa: BLE001 - whatever a hostile config makes a layer raise
    raise ConversionError(
      f"{source}: the model does not run on its declared inputs: {type(e).__name__}: "
      f"{clip(str(e), 500)[1:-1]}"
    ) from None


class KerasModel(nnx.Module):
  """A Keras Sequential or Functional model as an NNX module (see the module docstring).

  Args:
    config: The model's config as JSON data, ``{"class_name": ..., "config": {...}}``, already
      checked against the allow-list (:func:`adamjax.convert._keras_config.check_config`).
    weights: Layer path (``dense_1``, ``sequential/conv2d``) -> Keras variable name -> array.
    source: The file, for messages.
    prefix: This model's path below the root model (``sequential/``), for nested models.
  """

  def __init__(
    self,
    config: dict[str, Any],
    weights: Mapping[str, Mapping[str, np.ndarray]],
    *,
    source: str = "the model config",
    prefix: str = "",
    trainable: bool = True,
  ):
    if not isinstance(config, dict) or config.get("class_name") not in MODELS:
      got = config.get("class_name") if isinstance(config, dict) else type(config).__name__
      raise ConversionError(f"{source}: {prefix or 'the model'} is a {clip(got)}, not a model")
    inner = config.get("config")
    entries = inner.get("layers") if isinstance(inner, dict) else None
    if not isinstance(entries, list) or not all(
      isinstance(e, dict) and isinstance(e.get("class_name"), str) for e in entries
    ):
      raise ConversionError(
        f"{source}: the model {prefix or '$'} has no list of layers with class names"
      )
    if config["class_name"] == "Sequential" and any(
      e["class_name"] == "InputLayer" for e in entries[1:]
    ):
      raise ConversionError(f"{source}: the Sequential {prefix or '$'} has an input inside it")
    # The root lists every unsupported class of the whole tree (nested models included) at once.
    missing = [] if prefix else unsupported_layers(config)
    if missing:
      raise ConversionError(
        f"{source}: {len(missing)} layer(s) of classes the converter does not build: "
        + ", ".join(missing)
      )
    names = _names(config)
    by_user_name, attributes = {}, []
    input_dtypes: dict[str, str | None] = {}
    cost = 0
    for entry, name in zip(entries, names, strict=True):
      where = f"{source}: layer {prefix}{name or entry.get('name')}"
      layer_config = entry.get("config")
      if not isinstance(layer_config, dict):
        raise ConversionError(f"{where}: its config is not an object")
      user_name = entry.get("name", layer_config.get("name"))
      if not isinstance(user_name, str) or user_name in by_user_name:
        raise ConversionError(f"{where}: missing or repeated layer name {clip(user_name)}")
      if entry.get("class_name") == "InputLayer":
        by_user_name[user_name] = None
        dtype = layer_config.get("dtype")
        input_dtypes[user_name] = dtype if isinstance(dtype, str) else None
        continue
      by_user_name[user_name] = name
      attributes.append(name)
      class_name = entry["class_name"]
      # Keras adds the penalties of trainable weights only (``_get_regularization_losses``).
      own_trainable = trainable and layer_config.get("trainable", True) is not False
      try:
        if is_operation(entry):
          module = OPS[entry["module"], class_name](layer_config, {})
        elif class_name in MODELS:
          module = KerasModel(
            entry, weights, source=source, prefix=f"{prefix}{name}/", trainable=own_trainable
          )
        else:
          cls = LAYERS[class_name]
          owned = weights.get(prefix + name, {})
          expected = cls.variables(layer_config)
          if set(owned) != set(expected):
            raise ConversionError(
              f"has variables {sorted(owned)} but a {class_name} with this config has "
              f"{list(expected)}"
            )
          module = cls(layer_config, owned)
          if not own_trainable:
            _drop_penalties(module)
      except ConversionError as e:
        if source in str(e):
          raise
        raise ConversionError(f"{where} ({class_name}): {e}") from None
      except Exception as e:  # noqa: BLE001 - whatever a hostile config makes a builder raise
        raise ConversionError(
          f"{where} ({class_name}): {type(e).__name__}: {clip(str(e), 300)[1:-1]}"
        ) from None
      setattr(self, name, module)
    self.graph = self._graph(config, entries, names, by_user_name, input_dtypes, source, prefix)
    # What one call costs, in layer calls, nested models counted each time they are called: a
    # small config reusing a nested model at every level would otherwise cost K**depth.
    for step in self.graph.steps:
      module = getattr(self, step[0])
      cost += module.cost if isinstance(module, KerasModel) else 1
      if cost > _MAX_NODES:
        raise ConversionError(
          f"{source}: the model {prefix or '$'} makes more than {_MAX_NODES} layer calls"
        )
    self.cost = cost

  @staticmethod
  def _graph(config, entries, names, by_user_name, input_dtypes, source, prefix) -> _Graph:
    where = f"{source}: model {prefix or '$'}"
    if config["class_name"] == "Sequential":
      first = entries[0] if entries else {}
      dtype = first["config"].get("dtype") if first.get("class_name") == ("InputLayer") else None
      steps = tuple((n, "", 0, (), ()) for n in names if n is not None)
      attributes = tuple(n for n in names if n is not None)
      return _Graph(
        True, (), (dtype if isinstance(dtype, str) else None,), (), None, steps, attributes
      )
    inner = config["config"]
    inputs = _io_refs(inner.get("input_layers"), f"{where}.input_layers")
    outputs = _io_refs(inner.get("output_layers"), f"{where}.output_layers")
    nodes = {}
    for entry in entries:
      user_name = entry.get("name", entry["config"].get("name"))
      if by_user_name[user_name] is not None:
        nodes[user_name] = _nodes(entry, f"{where} layer {clip(user_name)}")
    if sum(len(n) for n in nodes.values()) > _MAX_NODES:
      raise ConversionError(f"{where} has more than {_MAX_NODES} nodes")
    # Order the nodes so that every node's inputs are computed before it (depth-first from the
    # outputs, refusing cycles and references to layers or nodes the config does not have).
    order, state = [], {}

    def visit(ref: _Ref) -> None:
      if ref.layer not in by_user_name:
        raise ConversionError(
          f"{where}: a node refers to layer {clip(ref.layer)}, not in the model"
        )
      if by_user_name[ref.layer] is None:
        if ref.node != 0 or ref.tensor != 0:
          raise ConversionError(f"{where}: input {clip(ref.layer)} has no node {ref.node}")
        return
      key = (ref.layer, ref.node)
      if state.get(key) == "done":
        return
      if state.get(key) == "active":
        raise ConversionError(f"{where}: the graph has a cycle through layer {clip(ref.layer)}")
      if ref.node >= len(nodes[ref.layer]):
        raise ConversionError(f"{where}: layer {clip(ref.layer)} has no node {ref.node}")
      state[key] = "active"
      args, kwargs = nodes[ref.layer][ref.node]
      for r in _flatten_refs([args, kwargs]):
        visit(r)
      state[key] = "done"
      order.append(key)

    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 10_000))
    try:
      for ref in outputs:
        visit(ref)
    except RecursionError:
      raise ConversionError(f"{where}: the graph is too deep") from None
    finally:
      sys.setrecursionlimit(limit)
    steps = []
    for user_name, node in order:
      args, kwargs = nodes[user_name][node]
      steps.append(
        (by_user_name[user_name], user_name, node, _freeze_refs(args), _freeze_refs(kwargs))
      )
    for ref in inputs:
      if ref.layer not in by_user_name or by_user_name[ref.layer] is not None:
        raise ConversionError(f"{where}: input {clip(ref.layer)} is not an InputLayer")
    return _Graph(
      False,
      tuple((r.layer, r.node, r.tensor) for r in inputs),
      tuple(input_dtypes.get(r.layer) for r in inputs),
      tuple((r.layer, r.node, r.tensor) for r in outputs),
      # Keras returns a single output bare, however it was written (``Functional.call``
      # ``unpack_singleton``); outputs given as a dict come back as a dict.
      tuple(inner["output_layers"]) if isinstance(inner["output_layers"], dict) else None,
      tuple(steps),
      tuple(
        by_user_name[e.get("name", e["config"].get("name"))]
        for e in entries
        if by_user_name[e.get("name", e["config"].get("name"))] is not None
      ),
    )

  def __call__(self, *inputs: Any, training: bool | None = None, rngs: nnx.Rngs | None = None):
    """The model's outputs for ``inputs`` (one array per Keras input), as ``model(x)`` in Keras.

    ``training`` as in Keras: True or False applies to every layer (``fit``, ``predict``);
    None (the default) is inference except where the config fixes a node's own ``training``.
    ``rngs`` (an ``nnx.Rngs`` with a ``dropout`` stream) drives the random layers in training.
    """
    outputs, _, _ = self.run(list(inputs), None, training=training, rngs=rngs)
    return outputs

  def run(self, inputs: list[Any], masks: list[Any] | None, *, training: bool | None, rngs: Any):
    """``(outputs, output masks, activity losses)`` for a list of inputs and their masks."""
    g = self.graph
    masks = masks if masks is not None else [None] * len(inputs)
    losses: list[jax.Array] = []
    dtypes = g.input_dtypes if len(g.input_dtypes) == len(inputs) else [None] * len(inputs)
    inputs = [_as_input(x, dtype) for x, dtype in zip(inputs, dtypes, strict=True)]
    if g.sequential:
      if len(inputs) != 1:
        raise ValueError(f"a Sequential model takes one input, got {len(inputs)}")
      x, mask = inputs[0], masks[0]
      for name, *_ in g.steps:
        outs, out_masks = self._call(name, [x], {}, [mask], {}, training, rngs, losses)
        x, mask = (outs[0], out_masks[0]) if len(outs) == 1 else (outs, out_masks)
      return x, mask, losses
    if len(inputs) != len(g.inputs):
      raise ValueError(f"the model takes {len(g.inputs)} inputs, got {len(inputs)}")
    values: dict[tuple[str, int], tuple[list, list]] = {}
    for (layer, node, _), x, m in zip(g.inputs, inputs, masks, strict=True):
      values[layer, node] = ([x], [m])

    def get(ref: _Ref) -> tuple[Any, Any]:
      outs, out_masks = values[ref.layer, ref.node]
      if ref.tensor >= len(outs):
        raise ValueError(f"layer {ref.layer} node {ref.node} has no output {ref.tensor}")
      return outs[ref.tensor], out_masks[ref.tensor]

    for attr, user_name, node, args, kwargs in g.steps:
      args, kwargs = _thaw_refs(args), _thaw_refs(kwargs)
      arg_values = _map_refs(args, lambda r: get(r)[0])
      arg_masks = _map_refs(args, lambda r: get(r)[1], other=None)
      kw_values = _map_refs(kwargs, lambda r: get(r)[0])
      kw_masks = _map_refs(kwargs, lambda r: get(r)[1], other=None)
      values[user_name, node] = self._call(
        attr, arg_values, kw_values, arg_masks, kw_masks, training, rngs, losses
      )
    outs = [get(_Ref(*ref)) for ref in g.outputs]
    result = [o for o, _ in outs]
    out_masks = [m for _, m in outs]
    if g.output_keys is not None:
      return dict(zip(g.output_keys, result, strict=True)), out_masks, losses
    if len(result) == 1:
      return result[0], out_masks[0], losses
    return result, out_masks, losses

  def _call(self, attr, args, kwargs, arg_masks, kw_masks, training, rngs, losses):
    """One node: masks and dtypes as Keras's ``Layer.__call__``; returns flat outputs and masks."""
    layer = getattr(self, attr)
    kwargs = dict(kwargs)
    # A node's own ``training`` (``base(x, training=False)``) holds only while the model is
    # called without one: Keras's Functional overrides it with an explicit value
    # (``keras/src/models/functional.py`` ``operation_fn``), as ``fit`` and ``predict`` give.
    node_training = kwargs.pop("training", None)
    if training is None and node_training is not None:
      training = bool(node_training)
    # Tensor arguments given by keyword (``layer(inputs=x)``) are bound to their positions, as
    # Keras's CallSpec binds them, so the first one is the mask's source.
    names = ("inputs",) if isinstance(layer, KerasModel) else layer.call_args
    args, arg_masks, kw_masks = list(args), list(arg_masks), dict(kw_masks)
    while len(args) < len(names) and names[len(args)] in kwargs:
      arg_masks.append(kw_masks.pop(names[len(args)], None))
      args.append(kwargs.pop(names[len(args)]))
    if isinstance(layer, KerasModel):
      mask = kwargs.pop("mask", None)
      flat_in = args[0] if isinstance(args[0], list) else [args[0]]
      flat_masks = arg_masks[0] if isinstance(args[0], list) else [arg_masks[0]]
      if mask is not None:
        flat_masks = mask if isinstance(mask, list) else [mask]
      out, out_mask, inner = layer.run(flat_in, flat_masks, training=training, rngs=rngs)
      losses.extend(inner)
      return _flat_with_masks(out, out_mask)
    if layer.autocast:
      compute = layer.compute_dtype
      cast = lambda x: _autocast(x, compute)  # noqa: E731
      args = _map_leaves(args, cast)
      kwargs = _map_leaves(kwargs, cast)
    # Keras's mask population: the names of the tensor arguments (positional, then keywords).
    names = list(layer.call_args)
    tensor_args = {}
    for i, (a, m) in enumerate(zip(args, arg_masks, strict=True)):
      if _has_array(a):
        tensor_args[names[i] if i < len(names) else f"arg{i}"] = m
    for k, v in kwargs.items():
      if _has_array(v) and k not in ("mask",):
        tensor_args[k] = kw_masks.get(k)
    params = _call_parameters(type(layer))
    if len(tensor_args) == 1 and "mask" in params and kwargs.get("mask") is None:
      kwargs["mask"] = next(iter(tensor_args.values()))
    elif len(tensor_args) > 1:
      for k, m in tensor_args.items():
        if f"{k}_mask" in params and kwargs.get(f"{k}_mask") is None:
          kwargs[f"{k}_mask"] = m
    previous_mask = (
      kwargs["mask"] if kwargs.get("mask") is not None else (arg_masks[0] if arg_masks else None)
    )
    if "mask" not in params:
      kwargs.pop("mask", None)
    try:
      out = layer(*args, training=bool(training), rngs=rngs, **kwargs)
    except LayerCallError:
      raise
    except (ValueError, TypeError, IndexError, KeyError, ZeroDivisionError) as e:
      raise LayerCallError(
        f"layer {attr} ({type(layer).__name__}): {type(e).__name__}: {clip(str(e), 500)[1:-1]}"
      ) from e
    if layer.activity_regularizer is not None:
      for o in jax.tree.leaves(out):
        penalty = _regularizers.penalty(layer.activity_regularizer, o)
        if o.ndim:  # per example, as Keras (``divide_no_nan``: 0 for an empty batch)
          penalty = penalty / o.shape[0] if o.shape[0] else jnp.zeros_like(penalty)
        losses.append(penalty)
    out_mask = (
      layer.compute_mask(args[0] if args else None, previous_mask)
      if (layer.supports_masking)
      else None
    )
    return _flat_with_masks(out, out_mask)

  def losses(self) -> list[jax.Array]:
    """Every weight-regularizer penalty of the model's layers (Keras's ``model.losses`` without
    the activity terms, which :meth:`run` returns with the outputs)."""
    return [loss for layer in self.iter_layers() for loss in layer.losses()]

  def apply_constraints(self) -> None:
    """Keras's weight constraints, applied in place (after each optimizer update)."""
    for layer in self.iter_layers():
      layer.apply_constraints()

  def iter_layers(self):
    """Every built layer, nested models expanded, in the model's layer order."""
    for name in self.graph.attributes:
      layer = getattr(self, name)
      if isinstance(layer, KerasModel):
        yield from layer.iter_layers()
      else:
        yield layer


@functools.cache
def _call_parameters(cls: type) -> frozenset[str]:
  return frozenset(inspect.signature(cls.__call__).parameters)


def _has_array(x: Any) -> bool:
  return any(isinstance(leaf, (jax.Array, np.ndarray)) for leaf in jax.tree.leaves(x))


def _autocast(x: Any, dtype: str) -> Any:
  if isinstance(x, (jax.Array, np.ndarray)) and jnp.issubdtype(x.dtype, jnp.floating):
    return x.astype(dtype) if x.dtype != dtype else x
  return x


def _as_input(x: Any, dtype: str | None) -> Any:
  """An input as the InputLayer's dtype, as Keras's Functional converts its inputs."""
  x = jnp.asarray(x)
  return x.astype(dtype) if dtype is not None and x.dtype != dtype else x


def _map_leaves(x: Any, fn) -> Any:
  if isinstance(x, list):
    return [_map_leaves(v, fn) for v in x]
  if isinstance(x, dict):
    return {k: _map_leaves(v, fn) for k, v in x.items()}
  return fn(x)


_KEEP = object()


def _map_refs(x: Any, fn, other: Any = _KEEP) -> Any:
  """``x`` with each _Ref replaced by ``fn(ref)`` and other leaves kept (or set to ``other``)."""
  if isinstance(x, _Ref):
    return fn(x)
  if isinstance(x, list):
    return [_map_refs(v, fn, other) for v in x]
  if isinstance(x, dict):
    return {k: _map_refs(v, fn, other) for k, v in x.items()}
  return x if other is _KEEP else other


def _freeze_refs(x: Any) -> Any:
  return _freeze(_map_refs(x, lambda r: {"__ref__": [r.layer, r.node, r.tensor]}))


def _thaw_refs(x: Any) -> Any:
  def back(v):
    if isinstance(v, dict) and set(v) == {"__ref__"}:
      return _Ref(*v["__ref__"])
    if isinstance(v, dict):
      return {k: back(w) for k, w in v.items()}
    if isinstance(v, list):
      return [back(w) for w in v]
    return v

  return back(_thaw(x))


def _flat_with_masks(out: Any, mask: Any) -> tuple[list, list]:
  """Keras's ``_set_mask_metadata``: the flat outputs, each with the flat mask at its position."""
  flat = out if isinstance(out, (list, tuple)) else [out]
  flat = list(flat)
  masks = mask if isinstance(mask, (list, tuple)) else [mask]
  masks = list(masks)[: len(flat)] + [None] * max(0, len(flat) - len(masks))
  return flat, masks


def _drop_penalties(layer: Any) -> None:
  """A frozen layer's weights are not trainable: Keras adds no regularizer penalty for them."""
  layer.regularized = ()
  for sub in layer._sublayers():
    _drop_penalties(sub)
