"""Optimizer-state sharding (ZeRO-1) on 8 simulated CPU devices: same numbers, 1/8 of the moments.

The check runs in a subprocess because the device count is fixed when JAX starts
(``--xla_force_host_platform_device_count``); this file is also that subprocess's script.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

DEVICES = 8
STEPS = 30


def _worker() -> dict:
  import jax
  import optax
  from jax.sharding import Mesh, NamedSharding
  from jax.sharding import PartitionSpec as P

  import adamjax

  assert jax.device_count() == DEVICES, jax.devices()
  mesh = Mesh(np.array(jax.devices()), ("data",))
  replicated, batch_sharding = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
  rng = np.random.default_rng(0)
  shapes = {"dense": {"kernel": (784, 128), "bias": (128,)}, "dense_1": {"kernel": (128, 10)}}
  shapes["dense_1"]["bias"] = (10,)  # divisible by nothing: stays replicated
  params = jax.tree.map(
    lambda s: (0.05 * rng.standard_normal(s)).astype(np.float32),
    shapes,
    is_leaf=lambda s: isinstance(s, tuple),
  )
  images = rng.random((STEPS, 32, 784), dtype=np.float32)
  labels = rng.integers(0, 10, (STEPS, 32))
  tx = adamjax.keras_adam(1e-3)

  def loss_fn(p, x, y):
    h = jax.nn.relu(x @ p["dense"]["kernel"] + p["dense"]["bias"])
    logits = h @ p["dense_1"]["kernel"] + p["dense_1"]["bias"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  def step(p, s, x, y):
    grads = jax.grad(loss_fn)(p, x, y)
    updates, s = tx.update(grads, s, p)
    return optax.apply_updates(p, updates), s

  def run(state_shardings):
    jitted = jax.jit(step, out_shardings=(replicated, state_shardings), donate_argnums=(0, 1))
    p = jax.device_put(params, replicated)
    s = jax.device_put(tx.init(params), state_shardings)
    args = (jax.device_put(images[0], batch_sharding), jax.device_put(labels[0], batch_sharding))
    memory = jitted.lower(p, s, *args).compile().memory_analysis()
    for t in range(STEPS):
      x = jax.device_put(images[t], batch_sharding)
      y = jax.device_put(labels[t], batch_sharding)
      p, s = jitted(p, s, x, y)
    shard_bytes = sum(
      int(np.prod(leaf.addressable_shards[0].data.shape)) * leaf.dtype.itemsize
      for leaf in jax.tree.leaves(s)
    )
    return jax.device_get((p, s)), shard_bytes, memory.argument_size_in_bytes

  template = tx.init(params)
  (p_rep, s_rep), rep_bytes, rep_args = run(jax.tree.map(lambda _: replicated, template))
  sharded = adamjax.state_sharding(template, mesh)
  (p_sh, s_sh), sh_bytes, sh_args = run(sharded)
  same = all(
    np.array_equal(np.atleast_1d(a).view(np.uint8), np.atleast_1d(b).view(np.uint8))
    for a, b in zip(jax.tree.leaves((p_rep, s_rep)), jax.tree.leaves((p_sh, s_sh)), strict=True)
  )
  moved = float(np.max(np.abs(p_rep["dense"]["kernel"] - params["dense"]["kernel"])))
  specs = {jax.tree_util.keystr(k): str(v.spec) for k, v in jax.tree.leaves_with_path(sharded)}
  return {
    "bit_identical": bool(same),
    "params_moved": moved,
    "state_bytes_per_device": {"replicated": rep_bytes, "sharded": sh_bytes},
    "xla_argument_bytes_per_device": {"replicated": rep_args, "sharded": sh_args},
    "specs": specs,
  }


@pytest.mark.slow
def test_sharded_adam_state_is_bit_identical_and_eighth_size():
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={DEVICES}")
  env["JAX_PLATFORMS"] = "cpu"
  out = subprocess.run(
    [sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600, check=False
  )
  assert out.returncode == 0, out.stderr[-4000:]
  report = json.loads(out.stdout.strip().splitlines()[-1])
  assert report["params_moved"] > 1e-3  # the run really trained
  assert report["bit_identical"], report
  # The moments of every leaf but dense_1/bias (10 elements) are split 8 ways; the count stays.
  assert "P(None, 'data')" in report["specs"].values() or "P('data',)" in report["specs"].values()
  rep, sh = report["state_bytes_per_device"].values()
  assert sh < rep / 7.5, report
  rep_args, sh_args = report["xla_argument_bytes_per_device"].values()
  moments = rep - 4  # the int32 count
  # XLA's own per-device figure drops by the moments' 7/8 (params and the batch stay whole).
  assert rep_args - sh_args == pytest.approx(moments * 7 / 8, rel=0.01), report


if __name__ == "__main__":
  print(json.dumps(_worker()))
