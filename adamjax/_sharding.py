"""Optimizer-state sharding over a data-parallel mesh axis (ZeRO-1; FSDP when applied to params).

In plain data parallelism every device holds the parameters and both Adam moments whole. Adam's
arithmetic is elementwise, so each device only needs the slice of ``mu``/``nu`` for the slice of
the update it computes: laying the moments out over the data axis with :func:`jax.sharding`
annotations is enough for XLA to compute each slice once and gather the updates where the
parameters are replicated. No collective is written by hand, and the numbers do not change (each
element goes through the same float32 operations, in the same order, on one device).

Example (8 devices, moments 1/8 per device)::

  mesh = jax.sharding.Mesh(jax.devices(), ("data",))
  opt_state = jax.device_put(tx.init(params), adamjax.state_sharding(tx.init(params), mesh))
  step = jax.jit(step, out_shardings=(replicated, adamjax.state_sharding(opt_state, mesh)))
"""

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

__all__ = ["state_sharding"]


def _spec(shape: tuple[int, ...], parts: int, axis: str) -> P:
  """Shards the largest dimension that ``parts`` divides; replicates when none does."""
  dims = [d for d, n in enumerate(shape) if n >= parts and n % parts == 0]
  if not dims:
    return P()
  dim = max(dims, key=lambda d: shape[d])
  return P(*([None] * dim), axis)


def state_sharding(tree: Any, mesh: Mesh, axis: str = "data") -> Any:
  """Returns a tree of :class:`NamedSharding` that splits each array of ``tree`` over ``axis``.

  Each array is split along its largest dimension divisible by the size of ``axis``; scalars
  (step counts), ``None`` and arrays no dimension of which divides evenly stay replicated, so the
  result is valid for any optimizer state. Pass it to ``jax.device_put`` and as the state's
  ``out_shardings`` of the jitted step.

  Args:
    tree: an optimizer state (or parameters), arrays or ``jax.ShapeDtypeStruct`` leaves.
    mesh: the device mesh.
    axis: the mesh axis to split over (the data-parallel one).

  Returns:
    A tree with the structure of ``tree`` and a ``NamedSharding`` at each leaf.

  Raises:
    ValueError: ``axis`` is not an axis of ``mesh``.
  """
  if axis not in mesh.shape:
    raise ValueError(f"axis {axis!r} is not an axis of the mesh {dict(mesh.shape)}")
  parts = mesh.shape[axis]

  def leaf(x: Any) -> NamedSharding:
    return NamedSharding(mesh, _spec(tuple(np.shape(x)), parts, axis))

  return jax.tree.map(leaf, tree)
