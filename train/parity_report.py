"""train/parity.py's report: parameter, loss and gradient differences, the plot, the summary.

Differences are float64 maxima over every entry of every parameter: ``param_abs`` is
max|θ_jax - θ_keras| and ``param_rel`` is that divided by max|θ_keras|; ulp distances are
``adamjax.testing.ulp_distance``'s.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import sys
from pathlib import Path
from typing import Any

import numpy as np

from adamjax.testing import ulp_distance
from train.files import atomic_write


def compare_params(
  jax_params: dict[str, np.ndarray], keras_params: dict[str, np.ndarray]
) -> dict[str, Any]:
  """Parameter differences per recorded step, and per parameter at the last one.

  Args:
    jax_params: Name -> ``[recorded, *shape]`` stack from the JAX run.
    keras_params: The same from the Keras run, the reference.

  Returns:
    ``param_abs``, ``param_rel`` and ``identical_fraction`` (bitwise-equal entries), lists over
    the recorded steps; ``per_param_final``: per parameter at the last recorded step, its max
    abs difference, that relative to its own max|θ|, its max|θ| and the max ulp distance.
  """
  names = list(keras_params)
  axes = {n: tuple(range(1, keras_params[n].ndim)) for n in names}
  diff = {
    n: np.abs(jax_params[n].astype(np.float64) - keras_params[n]).max(axis=axes[n], initial=0.0)
    for n in names
  }
  scale = {
    n: np.abs(keras_params[n]).max(axis=axes[n], initial=0.0).astype(np.float64) for n in names
  }
  same = sum(np.sum(jax_params[n] == keras_params[n], axis=axes[n]) for n in names)
  total = sum(keras_params[n][0].size for n in names)
  abs_ = np.max([diff[n] for n in names], axis=0)  # np.max keeps NaNs: they must fail.
  # All-zero variables have no scale: their relative difference is their absolute one.
  scale_all = np.max([scale[n] for n in names], axis=0)
  rel = abs_ / np.where(scale_all > 0, scale_all, 1.0)
  per_param = {
    n: {
      "abs": float(diff[n][-1]),
      "rel_to_own_max": float(diff[n][-1] / max(scale[n][-1], 1e-30)),
      "max_abs_param": float(scale[n][-1]),
      "max_ulps": int(ulp_distance(jax_params[n][-1], keras_params[n][-1]).max(initial=0)),
    }
    for n in names
  }
  return {
    "param_abs": abs_.tolist(),
    "param_rel": rel.tolist(),
    "identical_fraction": (same / total).tolist(),
    "per_param_final": per_param,
  }


def gradient_diffs(
  jax_grads: dict[str, np.ndarray], keras_grads: dict[str, np.ndarray]
) -> dict[str, Any]:
  """Step-1 gradients (same weights, same batch): how far apart the two frameworks' ops are."""
  out = {}
  for n in keras_grads:
    j, k = jax_grads[n], keras_grads[n]
    d = np.abs(j.astype(np.float64) - k)
    out[n] = {
      "abs": float(d.max()),
      "rel": float(d.max() / max(np.abs(k).max(), 1e-30)),
      "max_ulps": int(ulp_distance(j, k).max(initial=0)),
      "identical_fraction": float(np.mean(j == k)),
    }
  return out


def _milestones(steps: np.ndarray, values: dict[str, list[float]]) -> dict[str, dict[str, float]]:
  """The differences at steps 1, 10, 100, ... and the last step, keyed by step."""
  keep = {s for s in (10**k for k in range(len(str(int(steps[-1]))))) if s in set(steps)}
  keep.add(int(steps[-1]))
  index = {int(s): i for i, s in enumerate(steps)}
  return {str(s): {k: v[index[s]] for k, v in values.items()} for s in sorted(keep)}


def _versions() -> dict[str, str]:
  import flax
  import jax
  import jaxlib
  import optax

  import adamjax

  return {
    "python": platform.python_version(),
    "numpy": np.__version__,
    "jax": jax.__version__,
    "jaxlib": jaxlib.__version__,
    "flax": flax.__version__,
    "optax": optax.__version__,
    "adamjax": adamjax.__version__,
    "jax_backend": jax.default_backend(),
    "machine": platform.machine(),
    "XLA_FLAGS": os.environ.get("XLA_FLAGS"),
  }


def make_report(
  config: Any,
  data_source: str,
  recorded: np.ndarray,
  keras_run: dict,
  jax_run: dict,
  *,
  tolerance: float | None = None,
  checks: dict[str, Any] | None = None,
  extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
  """The report of one comparison (see ``train.parity.run_parity`` for its fields).

  Args:
    config: The ``ParityConfig`` compared.
    data_source: Where the batches came from.
    recorded: The 1-based steps whose parameters both runs recorded.
    keras_run: ``train.parity.run_keras``'s record, the reference.
    jax_run: ``train.parity.run_jax``'s record. With a ``state`` entry in both (name ->
      stack of the non-trainable variables: moving statistics, frozen weights), those are
      compared too (``state_abs``, ``state_rel``, ``max_state_rel``) and must also be within
      the tolerance.
    tolerance: The tolerance applied (default ``config.tolerance``).
    checks: More entries for ``checks`` (each must be true or a number to pass on its own).
    extra: More top-level fields (the model, its random layers, its loss...).
  """
  tolerance = config.tolerance if tolerance is None else tolerance
  # The optimizer on its own: JAX's update applied to Keras's own step-1 gradients.
  optimizer_only = {}
  for n in jax_run["step1_from_keras_grads"]:
    ours, theirs = jax_run["step1_from_keras_grads"][n], keras_run["params"][n][0]
    optimizer_only[n] = {
      "abs": float(np.max(np.abs(ours.astype(np.float64) - theirs))),
      "max_ulps": int(ulp_distance(ours, theirs).max()),
    }

  cmp = compare_params(jax_run["params"], keras_run["params"])
  loss_abs = np.abs(jax_run["loss"].astype(np.float64) - keras_run["loss"])
  rel = np.asarray(cmp["param_rel"])
  worst = int(np.argmax(np.where(np.isnan(rel), np.inf, rel)))  # A NaN is the worst step.
  max_rel = float(rel[worst])
  passed = bool(np.isfinite(max_rel) and max_rel <= tolerance)
  state = None
  if keras_run.get("state"):
    state = compare_params(jax_run["state"], keras_run["state"])
    state_rel = np.asarray(state["param_rel"])
    max_state_rel = float(np.max(np.where(np.isnan(state_rel), np.inf, state_rel)))
    passed = passed and bool(np.isfinite(max_state_rel) and max_state_rel <= tolerance)
  per_step = {
    "param_abs": cmp["param_abs"],
    "param_rel": cmp["param_rel"],
    "loss_abs": loss_abs[recorded - 1].tolist(),
  }
  report = {
    "config": dataclasses.asdict(config),
    "versions": {**_versions(), **keras_run["versions"]},
    "data_source": data_source,
    "steps": recorded.tolist(),
    "param_abs": cmp["param_abs"],
    "param_rel": cmp["param_rel"],
    "identical_fraction": cmp["identical_fraction"],
    "loss_keras": keras_run["loss"].tolist(),
    "loss_jax": jax_run["loss"].tolist(),
    "loss_abs": loss_abs.tolist(),
    "worst": {
      "step": int(recorded[worst]),
      "param_abs": cmp["param_abs"][worst],
      "param_rel": max_rel,
    },
    "final": {
      "step": config.steps,
      "param_abs": cmp["param_abs"][-1],
      "param_rel": cmp["param_rel"][-1],
      "loss_abs": float(loss_abs[-1]),
    },
    "milestones": _milestones(recorded, per_step),
    "max_loss_abs": float(loss_abs.max()),
    "per_param_final": cmp["per_param_final"],
    "grads_step1": gradient_diffs(jax_run["grads_step1"], keras_run["grads_step1"]),
    "step1_optimizer_only": optimizer_only,
    "checks": {
      **(
        {"pixels_match_keras": jax_run["pixels_match_keras"]}
        if "pixels_match_keras" in jax_run
        else {}
      ),
      **(checks or {}),
      # This process must never have loaded TensorFlow (only the worker does).
      "tensorflow_in_jax_process": "tensorflow" in sys.modules,
      "keras_iterations": keras_run["iterations"],
      "jax_count": jax_run["count"],
    },
    "criterion": "max over recorded steps of max|theta_jax - theta_keras| / max|theta_keras|",
    "tolerance": tolerance,
    "max_param_rel": max_rel,
    "passed": passed,
    "seconds": {"keras": keras_run["seconds"], "jax": jax_run["seconds"]},
  }
  if state is not None:
    report["criterion"] += "; the same for the non-trainable variables (state_rel)"
    report.update(
      state_abs=state["param_abs"],
      state_rel=state["param_rel"],
      max_state_rel=max_state_rel,
      per_state_final=state["per_param_final"],
    )
  report.update(extra or {})
  return report


def plot_report(report: dict[str, Any], path: Path) -> None:
  """Per-step differences on a log scale: parameters (abs and rel) above, loss below."""
  # A bare Figure (no pyplot): no backend switch, no display needed.
  from matplotlib.figure import Figure

  def positive(values):  # Exact zeros cannot sit on a log axis; they are left out.
    v = np.asarray(values, np.float64)
    return np.where(v > 0, v, np.nan)

  cfg = report["config"]
  steps = np.asarray(report["steps"])
  fig = Figure(figsize=(8, 7), constrained_layout=True)
  top, bottom = fig.subplots(2, 1, sharex=True)
  top.plot(steps, positive(report["param_abs"]), label="max |Δθ|")
  top.plot(steps, positive(report["param_rel"]), label="max |Δθ| / max |θ|")
  if "state_rel" in report:
    top.plot(steps, positive(report["state_rel"]), label="non-trainable: max |Δs| / max |s|")
  if "noise_floor" in report:
    floor = report["noise_floor"]
    top.plot(steps, positive(floor["param_rel"]), ls=":", label="Keras vs Keras (other TF kernels)")
  top.axhline(
    report["tolerance"],
    color="red",
    ls="--",
    lw=1,
    label=f"tolerance {report['tolerance']:g} (relative)",
  )
  top.set_yscale("log")
  top.set_ylabel("parameter difference")
  what = Path(cfg["model"]).name if cfg.get("model") else "tutorial MLP"
  top.set_title(
    f"{what}: Keras (TensorFlow) vs JAX {cfg['optimizer']}, dropout {cfg['dropout']}, "
    f"{report['data_source']} data: {'PASS' if report['passed'] else 'FAIL'}",
    fontsize=10,
  )
  top.legend()
  top.grid(alpha=0.3, which="both")
  all_steps = np.arange(1, len(report["loss_abs"]) + 1)
  bottom.plot(
    all_steps, positive(report["loss_abs"]), lw=0.8, label="|Δloss| (exact zeros not drawn)"
  )
  bottom.set_yscale("log")
  bottom.set_xlabel("step")
  bottom.set_ylabel("training loss difference")
  bottom.legend()
  bottom.grid(alpha=0.3, which="both")
  atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=100))


def summary(report: dict[str, Any]) -> str:
  lines = [f"{'step':>6} {'max|Δθ|':>10} {'rel':>10} {'|Δloss|':>10}"]
  for step, row in report["milestones"].items():
    lines.append(
      f"{step:>6} {row['param_abs']:10.3e} {row['param_rel']:10.3e} {row['loss_abs']:10.3e}"
    )
  w = report["worst"]
  verdict = "PASS" if report["passed"] else "FAIL"
  if "max_state_rel" in report:
    lines.append(f"non-trainable variables: worst rel {report['max_state_rel']:.3e}")
  if "noise_floor" in report:
    floor = report["noise_floor"]
    lines.append(
      f"noise floor ({floor['what']}): worst rel {floor['max_rel']:.3e}, "
      f"|Δloss| {floor['max_loss_abs']:.3e}"
    )
  if "mean_loss_rel" in report:
    lines.append(
      f"random layers on: mean-loss rel {report['mean_loss_rel']:.3e}; tolerance "
      f"{report['tolerance']:g}: {verdict}"
    )
  else:
    lines.append(
      f"worst: step {w['step']}, rel {w['param_rel']:.3e}; tolerance "
      f"{report['tolerance']:g}: {verdict}"
    )
  return "\n".join(lines)
