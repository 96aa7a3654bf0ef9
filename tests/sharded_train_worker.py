"""Run by tests/test_mnist_train.py on 8 simulated CPU devices: train/ with and without
``shard_optimizer_state``; prints one JSON line (bit-identity, XLA's per-device bytes).

Not a test module: the device count is fixed when JAX starts, so this runs in a subprocess
started with ``XLA_FLAGS=--xla_force_host_platform_device_count=8``.
"""

import dataclasses
import json
import sys
from pathlib import Path

import jax
import numpy as np

from train import checkpointing
from train import train as train_lib
from train.config import Config
from train.runtime import make_mesh

CONFIG = Config(
  data_source="synthetic",
  limit_train_examples=512,
  limit_test_examples=128,
  epochs=3,
  checkpoint_every=10,
  progress="none",
  plot=False,
)


def same_bits(a, b) -> bool:
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  return len(la) == len(lb) and all(
    x.dtype == y.dtype and x.shape == y.shape and np.array_equal(x, y)
    for x, y in zip(map(np.asarray, la), map(np.asarray, lb), strict=True)
  )


def xla_bytes(config: Config) -> dict[str, int]:
  """XLA's per-device argument bytes: of the params + optimizer state alone (a jitted identity
  on them), and of the whole training loop (which also takes the data)."""
  mesh = make_mesh(config.batch_size)
  graphdef, tx, state = train_lib.create_train_state(config, mesh)
  shardings = train_lib.state_shardings(state, mesh, config.shard_optimizer_state)
  keep = jax.jit(lambda s: s, out_shardings=shardings)
  params_and_state = keep.lower(state).compile().memory_analysis()
  steps = train_lib.make_train_steps(graphdef, tx, config.seed, mesh, shardings)
  data = train_lib.input_pipeline.load_data(config, verbose=False)
  on_device = train_lib.input_pipeline.to_devices(data, mesh)
  batches = train_lib._epoch_data(on_device, config, 0, mesh)
  loop = steps.lower(state, *batches, 0, 1).compile().memory_analysis()
  return {
    "params_and_state": params_and_state.argument_size_in_bytes,
    "train_loop": loop.argument_size_in_bytes,
    "train_loop_temp": loop.temp_size_in_bytes,
  }


def main(tmp: Path) -> dict:
  assert jax.device_count() == 8, jax.devices()
  sharded = dataclasses.replace(CONFIG, shard_optimizer_state=True)
  replicated_run = train_lib.train_and_evaluate(CONFIG, tmp / "replicated")
  sharded_run = train_lib.train_and_evaluate(sharded, tmp / "sharded")
  state = sharded_run["state"]
  specs = {
    jax.tree_util.keystr(k): str(x.sharding.spec)
    for k, x in jax.tree_util.tree_leaves_with_path(state.opt_state)
  }
  # Stopped mid-epoch 2 and resumed: the sharded state goes through an Orbax checkpoint.
  cut = tmp / "cut"
  train_lib.train_and_evaluate(dataclasses.replace(sharded, max_steps=25), cut)
  resumed = train_lib.train_and_evaluate(dataclasses.replace(sharded, resume=True), cut)
  _, rep_meta = checkpointing.load_train_state(tmp / "replicated")
  _, sh_meta = checkpointing.load_train_state(tmp / "sharded")
  moments = sum(x.nbytes for x in jax.tree.leaves(replicated_run["state"].opt_state) if x.ndim)
  return {
    "steps": sharded_run["step"],
    "bit_identical": same_bits(replicated_run["state"], sharded_run["state"]),
    "resumed_bit_identical": same_bits(sharded_run["state"], resumed["state"]),
    "resumed_sharded": str(jax.tree.leaves(resumed["state"].opt_state)[1].sharding.spec),
    "digests_equal": rep_meta["digest"] == sh_meta["digest"],
    "params_moved": float(
      np.max(np.abs(np.asarray(state.params["dense"]["kernel"]) - initial_kernel(CONFIG)))
    ),
    "moment_bytes": moments,
    "specs": specs,
    "xla_bytes_per_device": {
      "replicated": xla_bytes(CONFIG),
      "sharded": xla_bytes(sharded),
    },
  }


def initial_kernel(config: Config) -> np.ndarray:
  _, _, state = train_lib.create_train_state(config, make_mesh(config.batch_size))
  return np.asarray(state.params["dense"]["kernel"])


if __name__ == "__main__":
  print(json.dumps(main(Path(sys.argv[1]))))
