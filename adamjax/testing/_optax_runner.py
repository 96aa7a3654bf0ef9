"""Run any optax transformation over a gradient sequence and record what parity checks compare."""

from __future__ import annotations

from collections.abc import Mapping

import jax
import numpy as np
import optax


def run_optax(
  tx: optax.GradientTransformation,
  params: Mapping[str, np.ndarray],
  grads: Mapping[str, np.ndarray],
  *,
  jit: bool = True,
  fields: tuple[str, ...] = ("mu", "nu"),
) -> dict[str, dict[str, np.ndarray]]:
  """Applies `tx` for every step of `grads` (`[steps, ...]` per name) and stacks the results.

  Returns `{"params": {name: [steps, ...]}, "<field>": {...}}` for each state field in `fields`
  (looked up with `optax.tree_utils.tree_get`), recorded after every step. Jitted, it runs the
  steps as one `lax.scan` of the user-style step `update; apply_updates`; eagerly it loops in
  Python, op by op. The result lines up with :class:`Trajectory` (`params`, `mu`/`m`, `nu`/`v`).
  """
  params = {k: jax.numpy.asarray(v) for k, v in params.items()}
  state = tx.init(params)

  def step(carry, g):
    p, s = carry
    updates, s = tx.update(g, s, p)
    p = optax.apply_updates(p, updates)
    record = {"params": p} | {f: optax.tree_utils.tree_get(s, f) for f in fields}
    return (p, s), record

  if jit:
    _, records = jax.jit(lambda c, gs: jax.lax.scan(step, c, gs))((params, state), grads)
    return jax.tree.map(np.asarray, records)
  steps = len(next(iter(grads.values())))
  carry, out = (params, state), []
  for i in range(steps):
    carry, record = step(carry, {k: jax.numpy.asarray(v[i]) for k, v in grads.items()})
    out.append(jax.tree.map(np.asarray, record))
  return jax.tree.map(lambda *xs: np.stack(xs), *out)
