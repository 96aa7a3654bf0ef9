"""A TF2 checkpoint's object graph: decode it, and find a Keras model's layers in it.

A TensorBundle keys each variable by its *shortest* path from the saved root, so a Keras 3
kernel may be stored as ``optimizer/_trainable_variables/0/...`` rather than under the model.
The ``_CHECKPOINTABLE_OBJECT_GRAPH`` entry says what every key is: nodes are objects, children
are attributes, and a variable is the same node wherever it is reached from. Everything here
(and in ``_tf_optimizer.py``) works on node ids, never on key prefixes.

Layers are found as Keras 3.15 and tf-keras 2.21 lay them out: Keras 3
``model/_functional/_operations/<i>/_kernel`` (a Sequential wraps a Functional), tf-keras
``model/layer-<i>/kernel``.

References:
  ``tensorflow/core/protobuf/trackable_object_graph.proto``,
  ``tensorflow/python/checkpoint/graph_view.py`` (how keys are chosen).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from adamjax.convert import _wire
from adamjax.convert._ir import ConversionError
from adamjax.convert._safe_io import clip
from adamjax.convert._tensorbundle import OBJECT_GRAPH_KEY, BundleReader
from adamjax.convert._wire import LENGTH_DELIMITED, VARINT, WireFormatError

__all__ = [
  "NEVER_TRAINABLE",
  "Graph",
  "ObjectGraphNode",
  "is_model",
  "model_layers",
  "parse_object_graph",
  "read_object_graph",
]

# Variables Keras never trains, whatever the layer's ``trainable`` flag (BatchNormalization).
NEVER_TRAINABLE = frozenset({"moving_mean", "moving_variance"})


@dataclasses.dataclass(frozen=True)
class ObjectGraphNode:
  """One ``TrackableObject`` of the ``_CHECKPOINTABLE_OBJECT_GRAPH`` (node 0 is the root).

  Attributes:
    children: ``(local_name, node_id)`` of each tracked attribute, in file order.
    attributes: ``(name, full_name, checkpoint_key)`` of each saved tensor; a variable has
      one named ``VARIABLE_VALUE`` and ``full_name`` is the variable's own name.
    slot_variables: ``(original_variable_node_id, slot_name, slot_variable_node_id)``: the
      optimizer slots of TF1-style optimizers (tf-keras ``optimizers.legacy``).
  """

  children: tuple[tuple[str, int], ...]
  attributes: tuple[tuple[str, str, str], ...]
  slot_variables: tuple[tuple[int, str, int], ...]

  def child(self, name: str) -> int | None:
    """The node id of the child called ``name``, or None."""
    for local_name, node_id in self.children:
      if local_name == name:
        return node_id
    return None

  @property
  def variable_key(self) -> str | None:
    """The checkpoint key of this node's value if it is a variable, else None."""
    for name, _, key in self.attributes:
      if name == "VARIABLE_VALUE":
        return key
    return None

  @property
  def full_name(self) -> str | None:
    """The variable's own name as TF recorded it (Keras 3: its path), else None."""
    for name, full_name, _ in self.attributes:
      if name == "VARIABLE_VALUE":
        return full_name
    return None


def parse_object_graph(data: bytes, *, where: str = "object graph") -> list[ObjectGraphNode]:
  """Decodes a serialized ``TrackableObjectGraph``.

  Args:
    data: The proto bytes (the ``_CHECKPOINTABLE_OBJECT_GRAPH`` scalar string).
    where: Names the source in error messages.

  Returns:
    The nodes; node 0 is the root object that was saved.

  Raises:
    ConversionError: if the bytes do not decode, a reference points outside the graph, or a
      node uses a ``registered_saver`` (custom save code the reader cannot vouch for).
  """
  nodes = []
  try:
    for node_bytes in _wire.repeated(_wire.parse_message(data), 1, LENGTH_DELIMITED):
      fields = _wire.parse_message(node_bytes)
      if 4 in fields:
        saver = _wire.parse_message(_wire.scalar(fields, 4, LENGTH_DELIMITED, b""))
        name = _wire.scalar(saver, 1, LENGTH_DELIMITED, b"").decode(errors="replace")
        raise ConversionError(
          f"{where}: node {len(nodes)} is saved by registered_saver "
          f"{clip(name)} (custom save code); refused"
        )
      children = []
      for ref in _wire.repeated(fields, 1, LENGTH_DELIMITED):
        f = _wire.parse_message(ref)
        children.append(
          (
            _wire.scalar(f, 2, LENGTH_DELIMITED, b"").decode(),
            _wire.to_signed64(_wire.scalar(f, 1, VARINT)),
          )
        )
      attributes = []
      for tensor in _wire.repeated(fields, 2, LENGTH_DELIMITED):
        f = _wire.parse_message(tensor)
        attributes.append(
          tuple(_wire.scalar(f, i, LENGTH_DELIMITED, b"").decode() for i in (1, 2, 3))
        )
      slots = []
      for slot in _wire.repeated(fields, 3, LENGTH_DELIMITED):
        f = _wire.parse_message(slot)
        slots.append(
          (
            _wire.to_signed64(_wire.scalar(f, 1, VARINT)),
            _wire.scalar(f, 2, LENGTH_DELIMITED, b"").decode(),
            _wire.to_signed64(_wire.scalar(f, 3, VARINT)),
          )
        )
      nodes.append(ObjectGraphNode(tuple(children), tuple(attributes), tuple(slots)))
  except (WireFormatError, UnicodeDecodeError) as e:
    raise ConversionError(f"{where}: not a TrackableObjectGraph ({e})") from None
  for i, node in enumerate(nodes):
    refs = [c for _, c in node.children]
    refs += [r for orig, _, slot in node.slot_variables for r in (orig, slot)]
    if any(not 0 <= r < len(nodes) for r in refs):
      raise ConversionError(
        f"{where}: node {i} refers to a node outside the graph ({len(nodes)} nodes)"
      )
  return nodes


def read_object_graph(reader: BundleReader) -> list[ObjectGraphNode]:
  """The object graph of a TF2 checkpoint (see :func:`parse_object_graph`).

  Raises:
    ConversionError: if the bundle has no object graph (a TF1 name-based checkpoint), or as
      :func:`parse_object_graph`.
  """
  if OBJECT_GRAPH_KEY not in reader:
    raise ConversionError(
      f"{reader.index_path}: no {OBJECT_GRAPH_KEY} entry: a TF1 "
      "name-based checkpoint, which is not supported"
    )
  value = reader.read(OBJECT_GRAPH_KEY)
  if value.shape != () or not isinstance(value.item(), bytes):
    raise ConversionError(
      f"{reader.index_path}: entry {clip(OBJECT_GRAPH_KEY)} is not a scalar string"
    )
  return parse_object_graph(value.item(), where=f"{reader.index_path}: {OBJECT_GRAPH_KEY}")


@dataclasses.dataclass
class Graph:
  """A TensorBundle and its object graph, with the few queries the readers need.

  Attributes:
    reader: The opened bundle.
    nodes: The object graph; node 0 is the saved root.
    where: The index path, for error messages.
  """

  reader: BundleReader
  nodes: list[ObjectGraphNode]
  where: str
  _values: dict[int, np.ndarray] = dataclasses.field(default_factory=dict, repr=False)

  @classmethod
  def open(cls, prefix: str, *, verify_crc: bool = True, max_bytes: int | None = None) -> Graph:
    limits = {} if max_bytes is None else {"max_bytes": max_bytes}
    reader = BundleReader(prefix, verify_crc=verify_crc, **limits)
    return cls(reader, read_object_graph(reader), reader.index_path)

  def fail(self, problem: str) -> ConversionError:
    return ConversionError(f"{self.where}: {problem}")

  def child(self, node_id: int, name: str) -> int | None:
    return self.nodes[node_id].child(name)

  def child_names(self, node_id: int) -> list[str]:
    return [name for name, _ in self.nodes[node_id].children]

  def is_variable(self, node_id: int) -> bool:
    return self.nodes[node_id].variable_key is not None

  def items(self, node_id: int | None) -> list[int]:
    """The elements of a tracked list (children named ``0``, ``1``, ...), in index order."""
    if node_id is None:
      return []
    children = self.nodes[node_id].children
    if sorted(name for name, _ in children) != sorted(str(i) for i in range(len(children))):
      raise self.fail(
        f"node {node_id} is not a list (children {[name for name, _ in children][:8]})"
      )
    return [node for _, node in sorted(children, key=lambda c: int(c[0]))]

  def value(self, node_id: int) -> np.ndarray:
    """The saved value of variable node ``node_id`` (read once, then cached)."""
    if node_id not in self._values:
      key = self.nodes[node_id].variable_key
      if key is None:
        raise self.fail(f"node {node_id} is not a variable")
      try:
        self._values[node_id] = self.reader.read(key)
      except KeyError:
        raise self.fail(f"the object graph names key {clip(key)}, which the index lacks") from None
    return self._values[node_id]

  def scalar(self, node_id: int, kind: str, what: str):
    """A scalar variable's value, checked to be of numpy kind ``kind`` (``"i"``, ``"f"``)."""
    value = self.value(node_id)
    if value.shape != () or value.dtype.kind != kind:
      raise self.fail(f"{what} is {value.dtype} {value.shape}, expected a scalar")
    return value[()]


def is_model(graph: Graph, node_id: int) -> bool:
  """Whether a node is a Keras model (Keras 3 Sequential/Functional or any tf-keras Model)."""
  names = graph.child_names(node_id)
  return (
    "_functional" in names or "_operations" in names or any(n.startswith("layer-") for n in names)
  )


def model_layers(graph: Graph, model_id: int) -> list[dict[str, int]]:
  """The variables of each layer that owns some, in the model's layer order.

  Args:
    graph: The checkpoint.
    model_id: The model's node.

  Returns:
    Per layer, Keras's variable name (``kernel``; Keras 3 tracks it as ``_kernel``) to the
    variable's node id, in the order the layer tracks them.

  Raises:
    ConversionError: for a node that is not a model, or a model nested inside the model (its
      Keras class and so its name cannot be told from a TF checkpoint).
  """
  functional = graph.child(model_id, "_functional")  # A Keras 3 Sequential wraps a Functional.
  container = functional if functional is not None else model_id
  operations = graph.child(container, "_operations")
  if operations is not None:
    layer_ids = graph.items(operations)
  else:
    numbered = [
      (int(name[6:]), node)
      for name, node in graph.nodes[model_id].children
      if name.startswith("layer-") and name[6:].isdigit()
    ]
    if not numbered:
      raise graph.fail(
        f"node {model_id} is not a Keras model (children {graph.child_names(model_id)[:8]})"
      )
    layer_ids = [node for _, node in sorted(numbered)]
  layers = []
  for position, layer_id in enumerate(layer_ids):
    if is_model(graph, layer_id):
      raise graph.fail(
        f"layer {position} is itself a model: nested models are not "
        "supported in TF checkpoints (their Keras class, and so their "
        "name, is not stored)"
      )
    variables = {}
    for name, node in graph.nodes[layer_id].children:
      if graph.is_variable(node):
        variables[name.removeprefix("_")] = node
    if variables:
      layers.append(variables)
  return layers
