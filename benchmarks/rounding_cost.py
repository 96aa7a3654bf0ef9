"""What keeping TensorFlow's rounding under jax.jit costs: keras_adam with and without FMA fusion.

Times one jitted, donated optimizer step (update + apply_updates) on float32 parameters for
`adamjax.keras_adam` (products rounded before they are added, TF-exact), the same with
`fused_multiply_add=True` (XLA free to fuse), `adamjax.tf1_adam` both ways, and `optax.adam`,
interleaved in one run; prints the median ms/step and the ratio to the fused variant.

  python -m benchmarks.rounding_cost [--params 10000000] [--leaves 1] [--repeats 30]
"""

import argparse
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import optax

import adamjax


def make_step(tx):
  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  return jax.jit(step, donate_argnums=(0, 1))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--params", type=int, default=10_000_000)
  parser.add_argument("--leaves", type=int, default=1)
  parser.add_argument("--repeats", type=int, default=30)
  args = parser.parse_args()
  size = args.params // args.leaves
  grads = [jax.random.normal(jax.random.key(i), (size,)) * 1e-3 for i in range(args.leaves)]
  candidates = {
    "keras_adam (TF rounding)": adamjax.keras_adam(),
    "keras_adam fused_multiply_add": adamjax.keras_adam(fused_multiply_add=True),
    "tf1_adam (TF rounding)": adamjax.tf1_adam(),
    "tf1_adam fused_multiply_add": adamjax.tf1_adam(fused_multiply_add=True),
    "optax.adam": optax.adam(1e-3),
  }
  runs = {}
  for name, tx in candidates.items():
    params = [jnp.ones((size,)) for _ in range(args.leaves)]
    state = tx.init(params)
    step = make_step(tx)
    params, state = step(params, state, grads)
    jax.block_until_ready(params)
    runs[name] = [step, params, state, []]
  for _ in range(args.repeats):  # interleaved, so drift in machine load hits all alike
    for run in runs.values():
      step, params, state, times = run
      start = time.perf_counter()
      params, state = step(params, state, grads)
      jax.block_until_ready(params)
      times.append(time.perf_counter() - start)
      run[1], run[2] = params, state
  print(
    f"# {platform.processor() or platform.machine()}, jax {jax.__version__}, "
    f"{jax.devices()[0].device_kind}, {args.params:,} float32 params in {args.leaves} leaves,"
    f" median of {args.repeats}"
  )
  medians = {name: statistics.median(run[3]) * 1e3 for name, run in runs.items()}
  for name, ms in medians.items():
    base = medians[name.split(" ")[0] + " fused_multiply_add"] if "TF rounding" in name else ms
    print(f"{name:32s} {ms:8.2f} ms/step   x{ms / base:.3f} of fused")


if __name__ == "__main__":
  main()
