"""One-shot accelerator check: on a machine with a GPU or TPU, everything that differs there.

Runs in a few minutes and writes ``benchmarks/results/accelerator_<device>.md``:

1. Parity on the device: ``adamjax.adam`` against ``optax.adam`` (must be bit-identical), and,
   with Keras installed, ``keras_adam`` (with and without ``fused_multiply_add``) against Keras 3's
   own Adam on the JAX backend, jitted, on the same device: max ulps over 300 steps of params and
   both moments.
2. One Adam step at 100M and 1B float32 parameters, as 1 and 1,000 leaves: a device-to-device copy
   of the same bytes (the roofline), ``optax.adam`` and ``adamjax.adam`` per leaf, and
   ``adamjax.adam``/``keras_adam`` on :class:`adamjax.FlatLayout` buffers, all donated; median
   ms/step and effective GB/s (28 bytes per parameter), built with ``benchmarks.adam_step``'s
   runners but one variant at a time so 1B fits in memory.
3. Three epochs of ``train.mnist`` (the tutorial) on the device: test accuracy and time per step.
   The device machine may have no network: carry the MNIST cache (``train.mnist_data``'s
   ``default_cache_dir()``); without it this part reports why it did not run.

    python -m benchmarks.accelerator_check           # from the repository root, on the device
    python -m benchmarks.accelerator_check --smoke   # seconds, any machine: the harness itself
"""

import argparse
import json
import os
import pathlib
import re
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

os.environ.setdefault("KERAS_BACKEND", "jax")  # the in-process Keras reference is Keras-JAX

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

import adamjax  # noqa: E402
from adamjax import testing  # noqa: E402
from benchmarks import adam_step  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
PARITY_SHAPES = {"bias": (7,), "kernel": (300, 200), "conv": (3, 3, 16, 32), "scale": ()}
PARITY_STEPS = 300


def parity() -> list[dict[str, Any]]:
  """Max ulps against the references on the default device (0 is bit-identical)."""
  params = testing.make_params(PARITY_SHAPES, 0)
  grads = testing.make_gradient_sequence(PARITY_SHAPES, PARITY_STEPS, 1)

  def ulps(ours: dict, params_ref: Any, mu_ref: Any, nu_ref: Any) -> dict[str, int]:
    return {
      "params": testing.max_ulps(ours["params"], params_ref),
      "m": testing.max_ulps(ours["mu"], mu_ref),
      "v": testing.max_ulps(ours["nu"], nu_ref),
    }

  ref = testing.run_optax(optax.adam(1e-3), params, grads)
  ours = testing.run_optax(adamjax.adam(1e-3), params, grads)
  rows = [
    {"check": "adamjax.adam vs optax.adam", **ulps(ours, ref["params"], ref["mu"], ref["nu"])}
  ]
  try:
    import keras  # noqa: F401
  except ImportError as e:
    rows.append({"check": "keras_adam vs Keras-JAX", "skipped": f"Keras not installed ({e})"})
    return rows
  keras_ref = testing.run_keras_jax(params, grads, {}, jit=True)
  for fma in (True, False):
    ours = testing.run_optax(adamjax.keras_adam(fused_multiply_add=fma), params, grads)
    rows.append(
      {
        "check": f"keras_adam(fused_multiply_add={fma}) vs Keras-JAX jitted",
        **ulps(ours, keras_ref.params, keras_ref.m, keras_ref.v),
      }
    )
  return rows


def _device_tree(shapes: dict[str, Any], kind: str) -> Any:
  """Deterministic float32 leaves made on the device (1B parameters are slow to make on a host)."""
  leaves = adam_step.leaf_shapes(shapes)
  treedef = jax.tree.structure(shapes, is_leaf=lambda x: isinstance(x, tuple))
  key = jax.random.key(1 if kind == "params" else 2)
  scale, offset = (0.1, 1.0) if kind == "params" else (1e-3, 0.0)
  made = [
    offset + scale * jax.random.normal(jax.random.fold_in(key, i), s, jnp.float32)
    for i, s in enumerate(leaves)
  ]
  return treedef.unflatten(made)


def _variants(shapes: dict[str, Any], grads: Any):
  """The timed variants, made one at a time (each holds its own params and state)."""
  layout = adamjax.FlatLayout(grads)
  flat_grads = layout.ravel(grads)
  params = layout.ravel(_device_tree(shapes, "params"))
  moments = tuple(jax.tree.map(jnp.zeros_like, flat_grads) for _ in range(2))
  yield adam_step.jax_runner(
    "copy (same bytes)", adam_step.copy_step, params, moments, flat_grads, True
  )
  for label, tx in (("optax.adam", optax.adam(1e-3)), ("adamjax.adam", adamjax.adam(1e-3))):
    params = _device_tree(shapes, "params")
    step = adam_step.optimizer_step(tx)
    yield adam_step.jax_runner(f"{label} per-leaf", step, params, tx.init(params), grads, True)
  for preset in ("adam", "keras_adam"):
    tx = layout.optimizer(getattr(adamjax, preset)(1e-3))
    params = layout.ravel(_device_tree(shapes, "params"))
    step = adam_step.optimizer_step(tx)
    yield adam_step.jax_runner(f"flat {preset}", step, params, tx.init(params), flat_grads, True)


def step_timings(sizes: list[int], leaf_counts: list[int], rounds: int) -> list[dict[str, Any]]:
  """Median ms per donated Adam step, one variant alive at a time."""
  rows = []
  for nparams in sizes:
    for leaves in leaf_counts:
      shapes = adam_step.tree_shapes(str(leaves), nparams, leaves)
      for runner in _variants(shapes, _device_tree(shapes, "grads")):
        adam_step.time_interleaved([runner], rounds)
        ms = statistics.median(runner.times) * 1e3
        rows.append(
          {
            "params": nparams,
            "leaves": leaves,
            "variant": runner.name,
            "ms": ms,
            "gb_per_s": adam_step.BYTES_PER_PARAM * nparams / (ms * 1e-3) / 1e9,
            "compile_s": runner.compile_s,
          }
        )
        print(f"# {nparams:.0e} params, {leaves} leaves, {runner.name}: {ms:.3f} ms", flush=True)
        del runner
  return rows


def mnist(epochs: int) -> dict[str, Any]:
  """``train.mnist`` for ``epochs`` epochs on real MNIST, in a subprocess; its summary."""
  with tempfile.TemporaryDirectory() as workdir:
    command = [
      sys.executable,
      "-m",
      "train.mnist",
      "--epochs",
      str(epochs),
      "--workdir",
      workdir,
      "--progress",
      "none",
    ]
    start = time.perf_counter()
    out = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - start
    if out.returncode != 0:
      return {"skipped": (out.stderr.strip().splitlines() or ["no output"])[-1][:300]}
    summary = json.loads(pathlib.Path(workdir, "summary.json").read_text())
  return {"command": " ".join(command[1:]), "wall_s": round(wall, 1), "summary": summary}


def report(device: str, results: dict[str, Any], command: str) -> str:
  lines = [f"# Accelerator check: {device}", "", f"`{command}` on {results['when']}", ""]
  lines += ["## Parity on the device (max ulps over 300 steps; 0 = bit-identical)", ""]
  lines += ["| check | params | m | v |", "|---|---|---|---|"]
  for row in results["parity"]:
    if "skipped" in row:
      lines.append(f"| {row['check']} | skipped: {row['skipped']} | | |")
    else:
      lines.append(f"| {row['check']} | {row['params']} | {row['m']} | {row['v']} |")
  lines += ["", "## One donated Adam step (median ms; GB/s at 28 B/param)", ""]
  lines += ["| params | leaves | variant | ms | GB/s | compile s |", "|---|---|---|---|---|---|"]
  for r in results["steps"]:
    lines.append(
      f"| {r['params']:,} | {r['leaves']} | {r['variant']} | {r['ms']:.3f} | "
      f"{r['gb_per_s']:.0f} | {r['compile_s']:.1f} |"
    )
  lines += ["", "## train.mnist on the device", "", "```", json.dumps(results["mnist"], indent=2)]
  lines += ["```", ""]
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--smoke", action="store_true", help="tiny sizes, no MNIST, nothing written")
  parser.add_argument("--rounds", type=int, default=10)
  parser.add_argument("--out", help="report path (default benchmarks/results/accelerator_<dev>.md)")
  args = parser.parse_args(argv)
  device = jax.devices()[0]
  name = f"{device.platform} {getattr(device, 'device_kind', '')}".strip()
  print(f"# {name}: {jax.device_count()} device(s)", flush=True)
  if args.smoke:
    sizes, leaves, rounds, epochs = [100_000], [1, 10], 2, 0
  else:
    sizes, leaves, rounds, epochs = [100_000_000, 1_000_000_000], [1, 1000], args.rounds, 3
  results = {"when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "parity": parity()}
  results["steps"] = step_timings(sizes, leaves, rounds)
  results["mnist"] = mnist(epochs) if epochs else {"skipped": "--smoke"}
  text = report(name, results, "python -m benchmarks.accelerator_check " + " ".join(argv or []))
  print(text)
  if not args.smoke:
    slug = re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")
    out = pathlib.Path(args.out or ROOT / "benchmarks" / "results" / f"accelerator_{slug}.md")
    out.write_text(text)
    print(f"# wrote {out}", flush=True)
  return results


if __name__ == "__main__":
  main(sys.argv[1:])
