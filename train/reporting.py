"""What a run reports: metrics through a writer, Keras-style progress through a hook, the plot.

The writer has clu's ``write_scalars(step, scalars)`` shape (:class:`MetricWriter`), so another
backend (TensorBoard, clu's own writers) can stand in for :class:`WorkdirWriter`, which keeps
``metrics.jsonl`` (one object per epoch), ``metrics.png`` and ``summary.json`` in the workdir.
:class:`KerasProgress` prints what Keras's ``fit`` prints: a live bar on a terminal, or a line per
epoch.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

from train.files import atomic_write
from train.runtime import host


class MetricWriter(Protocol):
  """Receives the metrics of each finished epoch (clu's ``MetricWriter.write_scalars``)."""

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None: ...


class WorkdirWriter:
  """``metrics.jsonl`` and ``metrics.png`` rewritten whole at each epoch, atomically.

  Rewritten rather than appended, so a run resumed from a checkpoint (whose metadata holds the
  metrics so far) leaves exactly its checkpoint's epochs in the files, whatever a kill cut short.

  Args:
    workdir: Where the files go.
    plot: Also draw ``metrics.png``.
    enabled: False on all processes but the first: only one writes.
  """

  def __init__(self, workdir: Path, *, plot: bool, enabled: bool):
    self.workdir, self.plot, self.enabled = workdir, plot, enabled
    self.history: list[dict[str, Any]] = []

  def resume(self, history: list[dict[str, Any]]) -> None:
    """Continues after the rows a resumed run's checkpoint holds, and writes them out again
    (the kill may have come between the checkpoint and the files)."""
    self.history[:] = history
    if history:
      self._write()

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    self.history.append(dict(scalars, step=step))
    self._write()

  def write_summary(self, summary: Mapping[str, Any]) -> None:
    if self.enabled:
      text = json.dumps(summary, indent=2) + "\n"
      atomic_write(self.workdir / "summary.json", lambda p: p.write_text(text))

  def _write(self) -> None:
    if not self.enabled:
      return
    text = "".join(json.dumps(row) + "\n" for row in self.history)
    atomic_write(self.workdir / "metrics.jsonl", lambda p: p.write_text(text))
    if self.plot:
      plot_history(self.history, self.workdir / "metrics.png")


def plot_history(history: list[dict[str, Any]], path: Path) -> None:
  """Loss and accuracy per epoch, train and test, side by side, as a PNG."""
  # A bare Figure (no pyplot), so plotting never switches the caller's backend (a notebook's
  # inline one) and needs no display.
  from matplotlib.figure import Figure

  epochs = [row["epoch"] for row in history]
  fig = Figure(figsize=(10, 4), constrained_layout=True)
  for ax, name in zip(fig.subplots(1, 2), ("loss", "accuracy"), strict=True):
    ax.plot(epochs, [row[name] for row in history], "o-", label=f"train {name}")
    ax.plot(epochs, [row[f"val_{name}"] for row in history], "s--", label=f"test {name}")
    ax.set(xlabel="epoch", title=name, xticks=epochs)
    ax.grid(alpha=0.3)
    ax.legend()
  atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=100))


def console(enabled: bool) -> Callable[[str], None]:
  """``print`` with a flush where ``enabled`` (process 0, progress not ``none``), else nothing."""
  return (lambda message: print(message, flush=True)) if enabled else (lambda message: None)


class KerasProgress:
  """Keras-style epoch output: a live bar on a terminal, one line per epoch otherwise.

  The training loop calls :meth:`start` at each epoch, the hook itself each time the device
  loop returns to Python mid-epoch (with the steps done and the state's running sums), and
  :meth:`end` with the epoch's metrics.
  """

  BAR = 20

  def __init__(self, mode: str, epochs: int, steps: int, *, enabled: bool = True):
    if mode == "auto":
      mode = "bar" if sys.stdout.isatty() else "epoch"
    self.mode, self.epochs, self.steps = mode, epochs, steps
    self.enabled = mode != "none" and enabled
    self._line_open = False  # A bar drawn without its newline.

  def _bar(self, done: int, seconds: float, metrics: str) -> str:
    filled = self.BAR * done // self.steps
    per_step = seconds / max(done, 1)
    rate = f"{per_step * 1e3:.0f}ms" if per_step >= 1e-3 else f"{per_step * 1e6:.0f}us"
    width = len(str(self.steps))
    return (
      f"{done:{width}d}/{self.steps} {'━' * filled}{'─' * (self.BAR - filled)} "
      f"{seconds:.2f}s {rate}/step - {metrics}"
    )

  def start(self, epoch: int) -> None:
    if self.enabled:
      print(f"Epoch {epoch + 1}/{self.epochs}", flush=True)

  def __call__(self, done: int, seconds: float, state: Any) -> None:
    if self.enabled and self.mode == "bar":
      n = max(int(host(state.count)), 1)
      text = f"accuracy: {int(host(state.correct)) / n:.4f} - loss: {float(host(state.loss_sum)) / n:.4f}"
      print("\r" + self._bar(done, seconds, text), end="", flush=True)
      self._line_open = True

  def stopped(self, message: str) -> None:
    """A run that ends mid-epoch: ``message`` on a line of its own."""
    if self.enabled:
      print(("\n" if self._line_open else "") + message, flush=True)
      self._line_open = False

  def end(self, done: int, row: Mapping[str, Any]) -> None:
    self._line_open = False
    if self.enabled:
      keys = ("accuracy", "loss", "val_accuracy", "val_loss")
      text = " - ".join(f"{k}: {row[k]:.4f}" for k in keys)
      print(
        ("\r" if self.mode == "bar" else "") + self._bar(done, row["seconds"], text), flush=True
      )
