"""One Adam step on CPU, side by side: adamjax's presets, optax.adam, Keras 3, PyTorch, a copy.

Adam reads params, grads and both moments and writes params and moments: 28 bytes per float32
parameter. This harness times one optimizer step (update + apply, one jitted function) on the
same parameters laid out as 1, 10, 100 and 1,000 equal leaves and as a mixed tree (Dense-like
layers: kernel, bias, two norm vectors, widths drawn log-uniformly), with and without buffer
donation, and prints per variant:

  ms/step (median of interleaved rounds), effective GB/s at 28 B/param, the ratio to a copy of
  the same bytes (a jitted `(p, m, v) + g` on the FlatLayout buffers, same donation), the ratio to
  `optax.adam` (same tree, same donation), compile seconds (`lower` + `compile`, or the first
  call for Keras and PyTorch), and XLA's peak memory (`compile().memory_analysis()`: arguments
  + outputs - aliased + temporaries) with its excess over params + grads + state.

Variants: the copy; `optax.adam` and `adamjax.adam` on the per-leaf tree; `optax.flatten(
adamjax.adam)` (the automatic path for per-leaf trees, donated only); every adamjax preset on
`adamjax.FlatLayout` buffers (the fast path), and `adamjax.adam` on one buffer per dtype
(`max_buffer_bytes=None`); Keras 3 `Adam` on the JAX backend (jitted
`stateless_apply`) and the TensorFlow backend (`apply_gradients` in a `tf.function`, as `fit`
runs it), each in a subprocess (Keras picks its backend at import); `torch.optim.Adam`
(foreach and fused) for context. A second table times a whole training step of a toy model
(loss = sum of x * tanh(x) over leaves): per-leaf tree + optax.adam against flat buffers read
through `layout.unravel` + adamjax.adam.

  python -m benchmarks.adam_step            # full run, a few minutes; writes
                                            # benchmarks/results/adam_step_cpu.md
  python -m benchmarks.adam_step --quick    # seconds: a smoke test of the harness
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

BYTES_PER_PARAM = 28  # float32 Adam: read p, g, m, v; write p, m, v
# (label, preset, keyword arguments) of the flat variants: every preset at its defaults, and
# torch_adam without its emulated fused multiply-adds (to show what that emulation costs).
FLAT_PRESETS = tuple(
  (name, name, {})
  for name in (
    "adam",
    "adamw",
    "keras_adam",
    "keras_adamw",
    "tf1_adam",
    "torch_adam",
    "torch_adamw",
  )
) + (("torch_adam fused_multiply_add=False", "torch_adam", {"fused_multiply_add": False}),)
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "adam_step_cpu.md")


# ---------------------------------------------------------------------------------------------
# The parameter trees (deterministic, the same in every worker process)
# ---------------------------------------------------------------------------------------------


def tree_shapes(config: str, total: int, mixed_leaves: int) -> dict[str, Any]:
  """Leaf shapes of a configuration: "1", "10", ... equal 1-D leaves, or "mixed" layers."""
  if config != "mixed":
    n = int(config)
    return {f"p{i:04d}": (total // n,) for i in range(n)}
  layers = max(1, mixed_leaves // 4)
  widths = np.exp(np.random.default_rng(0).uniform(np.log(8), np.log(1024), layers + 1))
  raw = sum(widths[i] * widths[i + 1] for i in range(layers))
  widths = np.maximum(1, np.round(widths * math.sqrt(total / raw))).astype(int)
  return {
    f"layer_{i:03d}": {
      "kernel": (int(widths[i]), int(widths[i + 1])),
      "bias": (int(widths[i + 1]),),
      "norm_scale": (int(widths[i + 1]),),
      "norm_bias": (int(widths[i + 1]),),
    }
    for i in range(layers)
  }


def leaf_shapes(shapes: dict[str, Any]) -> list[tuple[int, ...]]:
  """The shapes in the order `jax.tree.leaves` visits them (sorted dict keys)."""
  out = []
  for key in sorted(shapes):
    value = shapes[key]
    out.extend(leaf_shapes(value) if isinstance(value, dict) else [value])
  return out


def host_leaves(shapes: list[tuple[int, ...]], kind: str) -> list[np.ndarray]:
  """Deterministic float32 values: params near 1, gradients of magnitude about 1e-3."""
  rng = np.random.default_rng(1 if kind == "params" else 2)
  scale, offset = (0.1, 1.0) if kind == "params" else (1e-3, 0.0)
  return [(offset + scale * rng.standard_normal(s)).astype(np.float32) for s in shapes]


# ---------------------------------------------------------------------------------------------
# Timing: every variant is a `Runner`; a configuration's runners are timed in interleaved rounds
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Runner:
  """One variant: a step `state -> state` on its own copy of the parameters."""

  name: str
  donate: bool | None  # None: not applicable (Keras TF, PyTorch)
  step: Callable[[Any], Any]
  state: Any
  compile_s: float | None = None
  peak_bytes: int | None = None
  resident_bytes: int | None = None  # params + grads + optimizer state
  times: list[float] = dataclasses.field(default_factory=list)

  def run(self) -> None:
    start = time.perf_counter()
    self.state = self.step(self.state)
    self.times.append(time.perf_counter() - start)


def time_interleaved(runners: list[Runner], rounds: int, warmup: int = 1) -> None:
  """Warms each runner up, then times one step of each per round, round-robin."""
  for runner in runners:
    for _ in range(warmup):
      runner.run()
    runner.times.clear()
  for _ in range(rounds):  # interleaved, so drifts in machine load hit every variant alike
    for runner in runners:
      runner.run()


def result_row(config: str, runner: Runner, nparams: int, framework: str) -> dict[str, Any]:
  return {
    "config": config,
    "variant": runner.name,
    "framework": framework,
    "donate": runner.donate,
    "ms": statistics.median(runner.times) * 1e3,
    "min_ms": min(runner.times) * 1e3,
    "rounds": len(runner.times),
    "compile_s": runner.compile_s,
    "peak_bytes": runner.peak_bytes,
    "resident_bytes": runner.resident_bytes,
    "nparams": nparams,
  }


# ---------------------------------------------------------------------------------------------
# JAX variants (this process)
# ---------------------------------------------------------------------------------------------


def _nbytes(tree: Any) -> int:
  import jax

  return sum(x.nbytes for x in jax.tree.leaves(tree))


def jax_runner(
  name: str, fn: Callable, params: Any, state: Any, grads: Any, donate: bool
) -> Runner:
  """Compiles `fn(params, state, grads) -> (params, state)` and wraps it as a Runner."""
  import jax

  jitted = jax.jit(fn, donate_argnums=(0, 1) if donate else ())
  start = time.perf_counter()
  compiled = jitted.lower(params, state, grads).compile()
  compile_s = time.perf_counter() - start
  mem = compiled.memory_analysis()
  peak = None
  if mem is not None:
    peak = (
      mem.argument_size_in_bytes
      + mem.output_size_in_bytes
      - mem.alias_size_in_bytes
      + mem.temp_size_in_bytes
    )

  def step(carry):
    out = compiled(*carry, grads)
    jax.block_until_ready(out)
    return out

  return Runner(
    name, donate, step, (params, state), compile_s, peak, _nbytes((params, state, grads))
  )


def optimizer_step(tx: Any) -> Callable:
  import optax

  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  return step


def copy_step(params, state, grads):
  """The roofline: reads p, g, m, v and writes p, m, v, as Adam does, with no arithmetic."""
  import jax

  add = lambda a, b: jax.tree.map(lambda x, y: x + y, a, b)  # noqa: E731
  m, v = state
  return add(params, grads), (add(m, grads), add(v, grads))


def jax_runners(shapes: dict[str, Any], donations: tuple[bool, ...]) -> list[Runner]:
  """Every in-process JAX variant for one tree (the tree's arrays are created per runner)."""
  import jax
  import jax.numpy as jnp
  import optax

  import adamjax

  flat_shapes = leaf_shapes(shapes)
  treedef = jax.tree.structure(shapes, is_leaf=lambda x: isinstance(x, tuple))
  host_p, host_g = host_leaves(flat_shapes, "params"), host_leaves(flat_shapes, "grads")
  tree = lambda leaves: treedef.unflatten([jnp.asarray(x) for x in leaves])  # noqa: E731
  grads_tree = tree(host_g)
  layout = adamjax.FlatLayout(grads_tree)
  grads_flat = layout.ravel(grads_tree)
  nparams = sum(math.prod(s) for s in flat_shapes)
  src, dst = np.ones(7 * nparams // 2, np.float32), np.zeros(7 * nparams // 2, np.float32)
  runners = [
    Runner("memcpy (numpy, 1 thread, 28 B/param)", None, lambda _: np.copyto(dst, src), None)
  ]
  for donate in donations:
    suffix = "" if donate else " (no donation)"
    params = layout.ravel(tree(host_p))
    zeros = lambda: jax.tree.map(jnp.zeros_like, grads_flat)  # noqa: E731
    runners.append(
      jax_runner(
        "copy (same bytes)" + suffix, copy_step, params, (zeros(), zeros()), grads_flat, donate
      )
    )
    per_leaf = [("optax.adam", optax.adam(1e-3))]
    if donate or len(flat_shapes) <= 100:  # compiling 1,000 leaves takes up to a minute
      per_leaf.append(("adamjax.adam per-leaf", adamjax.adam(1e-3)))
    if donate:
      per_leaf.append(("optax.flatten(adamjax.adam)", optax.flatten(adamjax.adam(1e-3))))
    for label, tx in per_leaf:
      params = tree(host_p)
      runners.append(
        jax_runner(label + suffix, optimizer_step(tx), params, tx.init(params), grads_tree, donate)
      )
    for label, preset, kwargs in FLAT_PRESETS:
      tx = layout.optimizer(getattr(adamjax, preset)(1e-3, **kwargs))
      params = layout.ravel(tree(host_p))
      runners.append(
        jax_runner(
          f"flat {label}" + suffix, optimizer_step(tx), params, tx.init(params), grads_flat, donate
        )
      )
    # The same with one buffer per dtype (max_buffer_bytes=None): why the default splits.
    one = adamjax.FlatLayout(grads_tree, max_buffer_bytes=None)
    tx = one.optimizer(adamjax.adam(1e-3))
    params = one.ravel(tree(host_p))
    runners.append(
      jax_runner(
        "flat adam, one buffer" + suffix,
        optimizer_step(tx),
        params,
        tx.init(params),
        one.ravel(grads_tree),
        donate,
      )
    )
  return runners


def toy_runners(shapes: dict[str, Any]) -> list[Runner]:
  """A whole training step of a toy model, per-leaf tree + optax.adam vs flat + adamjax.adam."""
  import jax
  import jax.numpy as jnp
  import optax

  import adamjax

  flat_shapes = leaf_shapes(shapes)
  treedef = jax.tree.structure(shapes, is_leaf=lambda x: isinstance(x, tuple))
  host_p = host_leaves(flat_shapes, "params")
  params = treedef.unflatten([jnp.asarray(x) for x in host_p])
  layout = adamjax.FlatLayout(params)

  def loss(tree):  # elementwise per leaf, so the model's own cost is one pass over params
    return sum(jnp.sum(x * jnp.tanh(x)) for x in jax.tree.leaves(tree))

  def tree_step(params, state, _):
    tx = optax.adam(1e-3)
    return optimizer_step(tx)(params, state, jax.grad(loss)(params))

  flat_tx = layout.optimizer(adamjax.adam(1e-3))

  def flat_step(flat, state, _):
    grads = jax.grad(lambda f: loss(layout.unravel(f)))(flat)
    return optimizer_step(flat_tx)(flat, state, grads)

  flat = layout.ravel(params)
  tree_params = treedef.unflatten([jnp.asarray(x) for x in host_p])
  return [
    jax_runner(
      "toy step: tree + optax.adam",
      tree_step,
      tree_params,
      optax.adam(1e-3).init(tree_params),
      None,
      True,
    ),
    jax_runner(
      "toy step: flat (unravel) + adamjax.adam", flat_step, flat, flat_tx.init(flat), None, True
    ),
  ]


# ---------------------------------------------------------------------------------------------
# Keras and PyTorch variants (subprocess workers; one JSON line per result)
# ---------------------------------------------------------------------------------------------


def keras_jax_runners(shapes: list[tuple[int, ...]], donations: tuple[bool, ...]) -> list[Runner]:
  import jax
  import keras

  runners = []
  for donate in donations:
    variables = [keras.Variable(x) for x in host_leaves(shapes, "params")]
    opt = keras.optimizers.Adam(learning_rate=1e-3)
    opt.build(variables)
    grads = [jax.numpy.asarray(x) for x in host_leaves(shapes, "grads")]

    def apply(trainable, opt_vars, grads, opt=opt):
      return opt.stateless_apply(opt_vars, grads, trainable)

    runners.append(
      jax_runner(
        "keras Adam, JAX backend (stateless_apply)" + ("" if donate else " (no donation)"),
        apply,
        [v.value for v in variables],
        [v.value for v in opt.variables],
        grads,
        donate,
      )
    )
  return runners


def keras_tf_runners(shapes: list[tuple[int, ...]], donations: tuple[bool, ...]) -> list[Runner]:
  del donations  # Keras updates its variables in place
  import keras
  import tensorflow as tf

  variables = [keras.Variable(x) for x in host_leaves(shapes, "params")]
  grads = [tf.constant(x) for x in host_leaves(shapes, "grads")]
  opt = keras.optimizers.Adam(learning_rate=1e-3)
  opt.build(variables)
  apply = tf.function(lambda grads: opt.apply_gradients(zip(grads, variables, strict=True)))

  def step(_):
    apply(grads)
    return int(opt.iterations.numpy())  # waits for the update

  start = time.perf_counter()
  step(None)  # traces the tf.function: Keras's "compile"
  return [
    Runner(
      "keras Adam, TF backend (apply_gradients)", None, step, None, time.perf_counter() - start
    )
  ]


def torch_runners(shapes: list[tuple[int, ...]], donations: tuple[bool, ...]) -> list[Runner]:
  del donations  # PyTorch updates in place
  import torch

  runners = []
  for mode in ("foreach", "fused"):
    params = [torch.nn.Parameter(torch.from_numpy(x)) for x in host_leaves(shapes, "params")]
    for p, g in zip(params, host_leaves(shapes, "grads"), strict=True):
      p.grad = torch.from_numpy(g)
    opt = torch.optim.Adam(params, lr=1e-3, **{mode: True})

    def step(_, opt=opt):
      opt.step()

    start = time.perf_counter()
    step(None)  # allocates the state
    runners.append(
      Runner(f"torch.optim.Adam {mode}", None, step, None, time.perf_counter() - start)
    )
  return runners


WORKERS = {
  "keras-jax": ("jax", keras_jax_runners),
  "keras-tf": ("tensorflow", keras_tf_runners),
  "torch": (None, torch_runners),
}


def run_worker(kind: str, args: argparse.Namespace) -> None:
  """Entry point of a worker subprocess: prints one JSON line per (config, variant)."""
  backend, make = WORKERS[kind]
  if backend:
    os.environ["KERAS_BACKEND"] = backend  # read once, when Keras is first imported (below)
  for config in args.configs:
    shapes = leaf_shapes(tree_shapes(config, args.params, args.mixed_leaves))
    runners = make(shapes, args.donations)
    rounds = args.rounds
    if kind == "keras-tf" and len(shapes) > 100:
      rounds = args.slow_rounds  # one step takes up to seconds here
    time_interleaved(runners, rounds)
    nparams = sum(math.prod(s) for s in shapes)
    for runner in runners:
      print("RESULT " + json.dumps(result_row(config, runner, nparams, kind)), flush=True)
    del runners


def spawn_worker(kind: str, args: argparse.Namespace) -> list[dict[str, Any]]:
  backend, _ = WORKERS[kind]
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
  if backend:
    env["KERAS_BACKEND"] = backend
  command = [
    sys.executable,
    os.path.abspath(__file__),
    "--worker",
    kind,
    "--params",
    str(args.params),
    "--configs",
    ",".join(args.configs),
    "--mixed-leaves",
    str(args.mixed_leaves),
    "--rounds",
    str(args.rounds),
    "--slow-rounds",
    str(args.slow_rounds),
    "--donations",
    ",".join(str(d).lower() for d in args.donations),
  ]
  proc = subprocess.run(command, env=env, capture_output=True, text=True)
  rows = [
    json.loads(line[len("RESULT ") :])
    for line in proc.stdout.splitlines()
    if line.startswith("RESULT ")
  ]
  if proc.returncode != 0:
    print(
      f"# worker {kind} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}", file=sys.stderr
    )
  return rows


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


def add_ratios(rows: list[dict[str, Any]]) -> None:
  """Ratio to the copy and to optax.adam of the same configuration and donation."""
  for row in rows:
    donated = row["donate"] is not False  # in-place frameworks compare with donated runs

    def base(prefix, row=row, donated=donated):
      return next(
        (
          r["ms"]
          for r in rows
          if r["config"] == row["config"]
          and r["variant"].startswith(prefix)
          and (r["donate"] is not False) == donated
        ),
        None,
      )

    copy, optax_ms = base("copy (same bytes)"), base("optax.adam")
    row["x_copy"] = row["ms"] / copy if copy else None
    row["x_optax"] = row["ms"] / optax_ms if optax_ms else None
    row["gbps"] = BYTES_PER_PARAM * row["nparams"] / (row["ms"] * 1e-3) / 1e9


def _fmt(value: Any, spec: str) -> str:
  return "—" if value is None else format(value, spec)


def table(rows: list[dict[str, Any]], toy: bool = False) -> str:
  head = (
    "| tree | variant | donated | ms/step | GB/s @28B | x copy | x optax.adam | "
    "compile s | peak MiB | over p+g+state MiB |"
  )
  if toy:
    head = "| tree | variant | ms/step | x tree | compile s | peak MiB | over p+g+state MiB |"
  lines = [head, "|" + "---|" * (head.count("|") - 1)]
  for row in rows:
    mib = lambda b: None if b is None else b / 2**20  # noqa: E731
    over = None
    if row["peak_bytes"] is not None and row["resident_bytes"] is not None:
      over = mib(row["peak_bytes"] - row["resident_bytes"])
    donated = {True: "yes", False: "no", None: "in place"}[row["donate"]]
    if toy:
      lines.append(
        f"| {row['config']} | {row['variant']} | {row['ms']:.2f} | "
        f"{_fmt(row.get('x_tree'), '.2f')} | {_fmt(row['compile_s'], '.2f')} | "
        f"{_fmt(mib(row['peak_bytes']), '.0f')} | {_fmt(over, '.1f')} |"
      )
    else:
      lines.append(
        f"| {row['config']} | {row['variant']} | {donated} | {row['ms']:.2f} | "
        f"{row['gbps']:.1f} | {_fmt(row['x_copy'], '.2f')} | {_fmt(row['x_optax'], '.2f')} | "
        f"{_fmt(row['compile_s'], '.2f')} | {_fmt(mib(row['peak_bytes']), '.0f')} | "
        f"{_fmt(over, '.1f')} |"
      )
  return "\n".join(lines)


def targets(rows: list[dict[str, Any]]) -> str:
  """The issue's targets, checked on this run's numbers (donated runs; flat presets)."""
  out = []
  flat = [
    r
    for r in rows
    if r["variant"].startswith("flat ")
    and r["donate"]
    and "," not in r["variant"]
    and " fused" not in r["variant"]
  ]  # the presets as is
  for config in dict.fromkeys(r["config"] for r in flat):
    mine = [r for r in flat if r["config"] == config]
    worst_copy = max(mine, key=lambda r: r["x_copy"])
    over = [r["variant"][5:] for r in mine if r["x_copy"] > 1.15]
    slower = [r["variant"][5:] for r in mine if r["x_optax"] > 1.0]
    memcpy = next(
      (r["ms"] for r in rows if r["config"] == config and r["variant"].startswith("memcpy")), None
    )
    vs_memcpy = (
      ""
      if memcpy is None
      else (
        f" (of the numpy memcpy: x{min(r['ms'] for r in mine) / memcpy:.2f}–"
        f"x{max(r['ms'] for r in mine) / memcpy:.2f})"
      )
    )
    out.append(
      f"- tree {config}: flat presets at x{min(r['x_copy'] for r in mine):.2f}–"
      f"x{worst_copy['x_copy']:.2f} of the copy{vs_memcpy} (over 1.15: "
      f"{', '.join(over) or 'none'}); "
      f"x{min(r['x_optax'] for r in mine):.2f}–x{max(r['x_optax'] for r in mine):.2f} of "
      f"optax.adam (slower than optax: {', '.join(slower) or 'none'}); compile "
      f"{max(r['compile_s'] for r in mine):.2f} s at most"
    )
  by = {(r["config"], r["variant"]): r for r in rows if r["donate"] is not False}
  configs = [c for c in dict.fromkeys(r["config"] for r in rows) if c != "1"]
  for variant in ("flat adam", "flat keras_adam", "optax.adam"):
    one = by.get(("1", variant))
    for config in configs:
      other = by.get((config, variant))
      if one and other and config in ("1000", "mixed"):
        out.append(
          f"- {variant}, tree {config} vs 1 leaf: x{other['ms'] / one['ms']:.2f} "
          f"(compile {other['compile_s']:.2f} s)"
        )
  return "\n".join(out)


def environment() -> str:
  import importlib.metadata as md

  cpu = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo") as f:
      cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
  except (OSError, StopIteration):
    pass
  mem = ""
  try:
    with open("/proc/meminfo") as f:
      mem = f", {int(f.readline().split()[1]) / 2**20:.0f} GiB RAM"
  except (OSError, ValueError, IndexError):
    pass
  versions = []
  for package in ("jax", "jaxlib", "optax", "numpy", "keras", "tensorflow-cpu", "torch"):
    try:
      versions.append(f"{package} {md.version(package)}")
    except md.PackageNotFoundError:
      pass
  return (
    f"- machine: {cpu}, {os.cpu_count()} CPUs{mem}; {platform.platform()}\n"
    f"- python {platform.python_version()}; " + ", ".join(versions)
  )


def write_report(
  path: str,
  args: argparse.Namespace,
  rows: list[dict[str, Any]],
  toy: list[dict[str, Any]],
  elapsed: float,
) -> str:
  command = "python -m benchmarks.adam_step " + " ".join(sys.argv[1:])
  trees = "; ".join(
    f"{c}: {len(leaf_shapes(tree_shapes(c, args.params, args.mixed_leaves)))} leaves"
    for c in args.configs
  )
  text = f"""# One Adam step on CPU: adamjax (flat buffers), optax, Keras 3, PyTorch, and a copy

- date: {datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")}
- command: `{command.strip()}` ({elapsed:.0f} s)
{environment()}
- parameters: {rows[0]["nparams"] if rows else 0:,} float32 ({trees}); gradients fixed,
  about 1e-3; learning rate 1e-3; median of {args.rounds} interleaved rounds of one step each
  ({args.slow_rounds} for Keras-TF above 100 leaves), after one warm-up step
- ms/step: wall time of one step, waited for; GB/s: 28 B/param over that time; x copy: over
  "copy (same bytes)", a jitted `(p + g, m + g, v + g)` on the FlatLayout's buffers (Adam's
  traffic, no arithmetic; same donation, same tree's run); "memcpy": `np.copyto` of 14 B/param
  (reads and writes 28 B/param, one thread), the plain-copy reference; x optax.adam: over
  optax.adam on the per-leaf tree (same donation); compile: lower + compile (Keras, PyTorch:
  the first call); peak: XLA's memory analysis (arguments + outputs - aliased + temporaries),
  "over" is peak minus params + grads + optimizer state
- "flat <preset>": `layout.optimizer(adamjax.<preset>(1e-3))` on `adamjax.FlatLayout(params)`
  buffers (4 MiB each on CPU; a larger leaf alone), so nearly the same computation at every leaf
  count; "flat adam, one buffer": `FlatLayout(params, max_buffer_bytes=None)`
- adamjax.adam per-leaf without donation is not run above 100 leaves (its compile takes up to a
  minute there)
- Keras and PyTorch run in their own processes, after the JAX variants, so they are not
  interleaved with them: compare their ratios with care on a shared machine

## Optimizer step

{table(rows)}

## Targets (this run)

{targets(rows)}
"""
  if toy:
    text += f"""
## Whole training step of a toy model (loss = sum of x * tanh(x) over leaves), donated

{table(toy, toy=True)}
"""
  if path:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
      f.write(text)
  return text


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument(
    "--quick",
    action="store_true",
    help="tiny smoke configuration (seconds); writes nothing unless --out",
  )
  parser.add_argument("--params", type=int, default=None, help="parameters (default 10M)")
  parser.add_argument(
    "--configs", default=None, help="comma-separated trees: leaf counts and/or 'mixed'"
  )
  parser.add_argument("--mixed-leaves", type=int, default=None)
  parser.add_argument("--rounds", type=int, default=None)
  parser.add_argument(
    "--slow-rounds",
    type=int,
    default=None,
    help="rounds for Keras-TF on trees of more than 100 leaves",
  )
  parser.add_argument("--donations", default="true,false")
  parser.add_argument(
    "--frameworks",
    default="keras-jax,keras-tf,torch",
    help="subprocess workers to run, comma-separated ('' for none)",
  )
  parser.add_argument("--no-toy", action="store_true", help="skip the toy training step")
  parser.add_argument("--out", default=None, help=f"report path (default {RESULTS})")
  parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  quick = {
    "params": 200_000,
    "configs": "1,10,mixed",
    "mixed_leaves": 40,
    "rounds": 3,
    "slow_rounds": 2,
  }
  full = {
    "params": 10_000_000,
    "configs": "1,10,100,1000,mixed",
    "mixed_leaves": 1000,
    "rounds": 15,
    "slow_rounds": 5,
  }
  for key, value in (quick if args.quick else full).items():
    if getattr(args, key) is None:
      setattr(args, key, value)
  args.configs = [c for c in args.configs.split(",") if c]
  args.donations = tuple(d.strip().lower() == "true" for d in args.donations.split(",") if d)
  args.frameworks = [f for f in args.frameworks.split(",") if f]
  if args.out is None and not args.quick and args.worker is None:
    args.out = RESULTS
  return args


def main(argv: list[str] | None = None) -> None:
  args = parse_args(argv)
  if args.worker:
    run_worker(args.worker, args)
    return
  start = time.perf_counter()
  rows, toy = [], []
  for config in args.configs:
    shapes = tree_shapes(config, args.params, args.mixed_leaves)
    runners = jax_runners(shapes, args.donations)
    time_interleaved(runners, args.rounds)
    nparams = sum(math.prod(s) for s in leaf_shapes(shapes))
    rows += [result_row(config, r, nparams, "jax") for r in runners]
    print(f"# tree {config}: {len(runners)} JAX variants timed", file=sys.stderr, flush=True)
    del runners
    if not args.no_toy and config in ("1", "mixed"):
      runners = toy_runners(shapes)
      time_interleaved(runners, args.rounds)
      toy += [result_row(config, r, nparams, "jax") for r in runners]
      del runners
  for kind in args.frameworks:
    rows += spawn_worker(kind, args)
    print(f"# {kind} done", file=sys.stderr, flush=True)
  order = {c: i for i, c in enumerate(args.configs)}
  rows.sort(key=lambda r: (order[r["config"]], r["donate"] is False))
  add_ratios(rows)
  for row in toy:
    tree_ms = next(
      r["ms"]
      for r in toy
      if r["config"] == row["config"] and r["variant"].startswith("toy step: tree")
    )
    row["x_tree"] = row["ms"] / tree_ms
  print(write_report(args.out, args, rows, toy, time.perf_counter() - start))
  if args.out:
    print(f"# written to {args.out}", file=sys.stderr)


if __name__ == "__main__":
  main()
