"""Read an Adam optimizer's state out of a TF2 checkpoint's object graph, by object identity.

Three optimizers leave three layouts (as Keras 3.15 and tf-keras 2.21 write them):

- Keras 3 ``Adam``: the optimizer tracks ``_trainable_variables`` and the lists ``_momentums``,
  ``_velocities`` (and ``_velocity_hats`` under AMSGrad) that share its index ``k``.
- tf-keras (Keras 2) ``Adam``: ``_momentums[k]`` is the slot of the k-th trainable variable, but
  the list of trainable variables is not saved (see :func:`_tf_keras_trainable`).
- tf-keras ``optimizers.legacy.Adam``: TF1-style ``slot_variables`` (``m``, ``v``, ``vhat``) in
  the optimizer node name each slot's variable; ``beta_1``, ``beta_2``, ``decay`` are variables.

Anything else (other algorithms, loss scaling, EMA, gradient accumulation, legacy ``decay``) is
refused: the IR holds Adam's state and nothing more.
"""

from __future__ import annotations

import dataclasses
import functools

from adamjax.convert._safe_io import clip
from adamjax.convert._tf_graph import NEVER_TRAINABLE, Graph

__all__ = ["Slots", "adam_slots"]


@dataclasses.dataclass
class Slots:
  """An Adam optimizer's state by variable node, before variables are named.

  Attributes:
    trainable: The trainable variables' node ids, in ``model.trainable_variables`` order.
    momentums, velocities, velocity_hats: Variable node id to slot node id.
    iterations_id, learning_rate_id: The counter's and the learning rate's nodes (the latter
      None when the learning rate is a schedule).
    config: What the checkpoint itself says of the optimizer's config.
    flavour: ``"Keras 3"``, ``"tf-keras"`` or ``"tf-keras legacy"``, for notes.
  """

  trainable: list[int]
  momentums: dict[int, int]
  velocities: dict[int, int]
  velocity_hats: dict[int, int]
  iterations_id: int
  learning_rate_id: int | None
  config: dict
  flavour: str


_KERAS3_CHILDREN = {
  "_variables",
  "_trainable_variables",
  "_trainable_variables_indices",
  "_iterations",
  "_learning_rate",
  "_momentums",
  "_velocities",
  "_velocity_hats",
}
_TF_KERAS_CHILDREN = {
  "_variables",
  "_iterations",
  "_learning_rate",
  "_index_dict",
  "_momentums",
  "_velocities",
  "_velocity_hats",
}
_LEGACY_CHILDREN = {"iter", "beta_1", "beta_2", "decay", "learning_rate"}


def adam_slots(graph: Graph, opt_id: int, layers: list[dict[str, int]]) -> Slots | None:
  """Reads the optimizer node ``opt_id`` as Adam; None if it was never built (no slots yet).

  Raises:
    ConversionError: for a LossScaleOptimizer, an optimizer that is not Adam (other slots or
      state), Adam variants the IR cannot carry (EMA, gradient accumulation), legacy Adam with
      time-based ``decay``, or slots that do not match their variables.
  """
  names = set(graph.child_names(opt_id))
  if "inner_optimizer" in names:
    raise graph.fail(
      "the optimizer is a LossScaleOptimizer (mixed precision): its dynamic "
      "loss scale has no place in the converted state; save the inner "
      "optimizer, or train without loss scaling"
    )
  if "iter" in names or graph.nodes[opt_id].slot_variables:
    return _legacy_slots(graph, opt_id, names)
  if "_trainable_variables" in names:
    flavour, allowed = "Keras 3", _KERAS3_CHILDREN
  elif "_iterations" in names:
    flavour, allowed = "tf-keras", _TF_KERAS_CHILDREN
  else:
    raise graph.fail(f"unrecognised optimizer (children {sorted(names)})")
  if names - allowed:
    raise graph.fail(
      f"the optimizer has state Adam does not: {sorted(names - allowed)} "
      "(not Adam, or an Adam option the converter does not support: "
      "use_ema, gradient_accumulation_steps)"
    )
  momentums = graph.items(graph.child(opt_id, "_momentums"))
  velocities = graph.items(graph.child(opt_id, "_velocities"))
  hats = graph.items(graph.child(opt_id, "_velocity_hats"))
  iterations_id = graph.child(opt_id, "_iterations")
  learning_rate_id = graph.child(opt_id, "_learning_rate")
  if learning_rate_id is not None and not graph.is_variable(learning_rate_id):
    learning_rate_id = None
  if flavour == "Keras 3":
    trainable = graph.items(graph.child(opt_id, "_trainable_variables"))
  else:
    trainable = _tf_keras_trainable(graph, layers, momentums)
  if not momentums and not velocities and not trainable:
    return None
  amsgrad = graph.child(opt_id, "_velocity_hats") is not None
  if (
    len(momentums) != len(trainable)
    or len(velocities) != len(trainable)
    or (amsgrad and len(hats) != len(trainable))
  ):
    raise graph.fail(
      f"{len(trainable)} trainable variables but {len(momentums)} "
      f"momentums, {len(velocities)} velocities, {len(hats)} velocity_hats"
    )
  # Every optimizer variable must be one of Adam's: anything else is another algorithm.
  known = {iterations_id, learning_rate_id, *momentums, *velocities, *hats}
  extra = [v for v in graph.items(graph.child(opt_id, "_variables")) if v not in known]
  if extra:
    raise graph.fail(
      f"the optimizer has {len(extra)} variables that are not Adam's "
      f"(e.g. {clip(graph.nodes[extra[0]].full_name)})"
    )
  return _checked(
    graph,
    Slots(
      trainable=trainable,
      momentums=dict(zip(trainable, momentums, strict=True)),
      velocities=dict(zip(trainable, velocities, strict=True)),
      velocity_hats=dict(zip(trainable, hats, strict=amsgrad)),
      iterations_id=iterations_id,
      learning_rate_id=learning_rate_id,
      config={"amsgrad": amsgrad},
      flavour=flavour,
    ),
  )


def _legacy_slots(graph: Graph, opt_id: int, names: set[str]) -> Slots | None:
  """tf-keras ``optimizers.legacy.Adam``: hyperparameter variables and TF1 slot variables."""
  if names - _LEGACY_CHILDREN or "iter" not in names:
    raise graph.fail(
      f"legacy optimizer with state Adam does not have: "
      f"{sorted(names - _LEGACY_CHILDREN)} (not Adam)"
    )
  slots: dict[str, dict[int, int]] = {"m": {}, "v": {}, "vhat": {}}
  for original, slot_name, slot in graph.nodes[opt_id].slot_variables:
    if slot_name not in slots:
      raise graph.fail(f"legacy optimizer slot {clip(slot_name)} is not Adam's (m, v, vhat)")
    slots[slot_name][original] = slot
  config = {"amsgrad": bool(slots["vhat"])}
  for beta in ("beta_1", "beta_2"):
    if (node := graph.child(opt_id, beta)) is not None:
      config[beta] = float(graph.scalar(node, "f", beta))
  if (node := graph.child(opt_id, "decay")) is not None:
    decay = float(graph.scalar(node, "f", "decay"))
    if decay != 0.0:
      raise graph.fail(
        f"legacy Adam with decay={decay}: time-based learning-rate decay "
        "(lr / (1 + decay * iterations)) cannot be represented; refused"
      )
  if not slots["m"] and not slots["v"]:
    return None
  trainable = list(slots["m"])
  if set(slots["v"]) != set(trainable) or (slots["vhat"] and set(slots["vhat"]) != set(trainable)):
    raise graph.fail("legacy Adam slots m, v (and vhat) cover different variables")
  lr = graph.child(opt_id, "learning_rate")
  return _checked(
    graph,
    Slots(
      trainable=trainable,
      momentums=slots["m"],
      velocities=slots["v"],
      velocity_hats=slots["vhat"],
      iterations_id=graph.child(opt_id, "iter"),
      learning_rate_id=lr if lr is not None and graph.is_variable(lr) else None,
      config=config,
      flavour="tf-keras legacy",
    ),
  )


def _checked(graph: Graph, slots: Slots) -> Slots:
  if slots.iterations_id is None or not graph.is_variable(slots.iterations_id):
    raise graph.fail("the optimizer has no iterations variable")
  for kind in ("momentums", "velocities", "velocity_hats"):
    for var, slot in getattr(slots, kind).items():
      if not graph.is_variable(var) or not graph.is_variable(slot):
        raise graph.fail(f"{kind} entry for node {var} is not a variable")
      if graph.value(var).shape != graph.value(slot).shape:
        raise graph.fail(
          f"{kind} slot {clip(graph.nodes[slot].full_name)} has shape "
          f"{graph.value(slot).shape}, its variable "
          f"{graph.value(var).shape}"
        )
  return slots


def _tf_keras_trainable(
  graph: Graph, layers: list[dict[str, int]], momentums: list[int]
) -> list[int]:
  """Which variables tf-keras's new optimizer built its slots for, in order.

  ``_momentums[k]`` belongs to the k-th of ``model.trainable_variables`` at build time, a list
  the optimizer does not save. It is the model's trainable-by-class variables in layer order
  minus the frozen layers, so this finds the one choice of layers whose variable shapes match
  the slots; if shapes allow several, the slot names (``Adam/m/<variable name>``, TF's
  ``full_name``) must single one out.
  """
  candidates = [
    [node for name, node in layer.items() if name not in NEVER_TRAINABLE] for layer in layers
  ]
  slot_shapes = [graph.value(m).shape for m in momentums]

  def fits(i: int, pos: int, by_name: bool) -> bool:
    nodes = candidates[i]
    if [graph.value(n).shape for n in nodes] != slot_shapes[pos : pos + len(nodes)]:
      return False
    return not by_name or all(
      (graph.nodes[m].full_name or "").endswith("/" + (graph.nodes[n].full_name or "?"))
      for n, m in zip(nodes, momentums[pos:], strict=False)
    )

  def solve(by_name: bool) -> tuple[int, list[int]]:
    """How many choices of layers fit (0, 1, or 2 for "several") and, if one, its nodes."""

    @functools.cache
    def count(i: int, pos: int) -> int:
      if i == len(candidates):
        return int(pos == len(slot_shapes))
      total = count(i + 1, pos)  # Layer i frozen...
      if candidates[i] and fits(i, pos, by_name):  # ... or trained.
        total += count(i + 1, pos + len(candidates[i]))
      return min(total, 2)

    if count(0, 0) != 1:
      return count(0, 0), []
    chosen, pos = [], 0
    for i, nodes in enumerate(candidates):
      if nodes and fits(i, pos, by_name) and count(i + 1, pos + len(nodes)):
        chosen.extend(nodes)
        pos += len(nodes)
    return 1, chosen

  found, chosen = solve(by_name=False)
  if found > 1:
    found, chosen = solve(by_name=True)
  if found == 1:
    return chosen
  raise graph.fail(
    f"cannot tell which layers the optimizer's {len(momentums)} slots belong "
    "to (tf-keras does not save the list of trainable variables, and their "
    "shapes and names do not settle it)"
  )
