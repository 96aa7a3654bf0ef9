"""Plumbing shared by every preset: validation, tree checks, counters.

The per-leaf Adam arithmetic lives in the preset modules; this module holds what maps it over
pytrees and keeps it honest (named errors, saturating counters). The guards that keep XLA from
changing float32 results under jit are in `_xla_exact`.
"""

from __future__ import annotations

import inspect
import numbers
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

__all__ = [
  "check_betas_representable",
  "check_hyperparameter",
  "check_static_int",
  "check_updates_match",
  "find_state",
  "given",
  "keras_learning_rate",
  "safe_increment",
  "resolve",
  "tree_map_leaves",
  "tree_unzip",
]

safe_increment = optax.safe_increment  # Saturates at the dtype's maximum instead of wrapping.


def _is_none(x: Any) -> bool:
  return x is None


def tree_map_leaves(fn: Callable[..., Any], tree: Any, *rest: Any) -> Any:
  """`jax.tree.map` that passes `None` update leaves through (as optax does)."""
  return jax.tree.map(
    lambda x, *xs: None if x is None else fn(x, *xs), tree, *rest, is_leaf=_is_none
  )


def tree_unzip(like: Any, tree: Any, n: int) -> tuple[Any, ...]:
  """Splits a tree of n-tuples, built by `tree_map_leaves` over `like`, into n trees."""
  treedef = jax.tree.structure(like, is_leaf=_is_none)
  leaves = treedef.flatten_up_to(tree)
  return tuple(
    treedef.unflatten([None if leaf is None else leaf[i] for leaf in leaves]) for i in range(n)
  )


def resolve(value: Any, count: jax.Array) -> Any:
  """Evaluates a hyperparameter that may be a schedule at the 0-based step `count`."""
  return value(count) if callable(value) else value


def keras_learning_rate(value: Any) -> Any:
  """A Keras learning rate as a number or a schedule of the 0-based iteration.

  Keras calls a `LearningRateSchedule` with `optimizer.iterations` and any other callable with
  no argument (`Adam(learning_rate=lambda: 0.1)`); an optax schedule needs the step. So a
  callable that can be called without arguments is called without, at each update (when the
  update is traced, under `jax.jit`), and one that needs an argument gets the iteration.
  """
  if not callable(value):
    return value
  try:
    inspect.signature(value).bind()
  except (TypeError, ValueError):  # needs the step (or has no signature): a schedule
    return value
  return lambda count: value()


def given(value: Any) -> bool:
  """Whether an optional option is on, as Keras's `if option:`, for arrays and tracers too.

  A traced value (an injected hyperparameter under `jax.jit`) cannot be tested and counts as
  on; an array is on when any element is nonzero.
  """
  if value is None:
    return False
  if isinstance(value, jax.core.Tracer):
    return True
  if isinstance(value, (jax.Array, np.ndarray, np.generic)):
    return bool(np.any(np.asarray(value) != 0))
  return bool(value)


def check_static_int(name: str, value: Any, *, low: int, allow_none: bool = True) -> int | None:
  """Returns `value` as a Python int, or raises `ValueError` naming `name` and `value`.

  Counts decide the structure of the computation, so they must be concrete: a 0-d integer
  array is accepted; a traced one (an `optax.inject_hyperparams` argument) is refused with the
  remedy, `static_args`.
  """
  if value is None and allow_none:
    return None
  if isinstance(value, jax.core.Tracer):
    raise ValueError(
      f"{name} must be a concrete integer, got a traced value {value!r}: it fixes the "
      f"structure of the update. With optax.inject_hyperparams, list it in static_args."
    )
  if isinstance(value, (jax.Array, np.ndarray, np.generic)) and (
    value.shape == () and jnp.issubdtype(value.dtype, jnp.integer)
  ):
    value = int(value)
  if isinstance(value, bool) or not isinstance(value, int) or value < low:
    raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
  return value


def check_hyperparameter(
  name: str,
  value: Any,
  *,
  low: float | None = None,
  high: float | None = None,
  high_inclusive: bool = False,
  allow_schedule: bool = False,
  scalar: bool = False,
) -> None:
  """Raises `ValueError` naming `name` and `value` if a concrete hyperparameter is invalid.

  Accepts what optax accepts: Python numbers, and NumPy or JAX scalars and arrays of any real
  dtype (bfloat16 and float16 included, as `optax.inject_hyperparams` passes them), checking
  every element of an array, which then broadcasts against the leaves as in optax (`scalar`
  refuses arrays that are not 0-d, where the framework takes a single number).
  Traced values (under `jax.jit`, or injected) cannot be checked when the transformation is
  built and are let through, and so are schedules where `allow_schedule`. Booleans, strings,
  None, complex numbers and Python sequences are refused: optax would fail on them later, or
  compute with them silently.
  """
  if isinstance(value, jax.core.Tracer):
    return
  if callable(value):
    if allow_schedule:
      return
    raise ValueError(f"{name} must be a number, got the callable {value!r}")
  if isinstance(value, (bool, np.bool_)) or not isinstance(
    value, (numbers.Real, np.generic, np.ndarray, jax.Array)
  ):
    raise ValueError(f"{name} must be a real number, got {value!r}")
  if isinstance(value, numbers.Real):
    array = np.asarray(float(value))
  elif jnp.issubdtype(value.dtype, jnp.floating) or jnp.issubdtype(value.dtype, jnp.integer):
    array = np.asarray(value, np.float64)
  else:
    raise ValueError(f"{name} must be a real number, got {value!r} of dtype {value.dtype}")
  if scalar and array.shape != ():
    raise ValueError(f"{name} must be a real scalar, got {value!r}")
  if not np.all(np.isfinite(array)):
    raise ValueError(f"{name} must be finite, got {value!r}")
  if low is not None and np.any(array < low):
    raise ValueError(f"{name} must be >= {low}, got {value!r}")
  if high is not None and np.any((array > high) | ((array == high) & (not high_inclusive))):
    bracket = "]" if high_inclusive else ")"
    hint = ""
    if hasattr(value, "dtype") and jnp.dtype(value.dtype).itemsize < 4:
      # optax.inject_hyperparams casts hyperparameters to the parameters' dtype, where 0.999
      # is 1.0 (bfloat16): optax then divides by a zero bias correction and trains on NaN.
      hint = (
        f" ({value.dtype} rounds betas near 1 to 1.0; with optax.inject_hyperparams pass "
        f"hyperparam_dtype=jnp.float32)"
      )
    raise ValueError(f"{name} must be in [{low}, {high}{bracket}, got {value!r}{hint}")


def check_betas_representable(params: Any, preset: str, **betas: Any) -> None:
  """Refuses parameters in a dtype where a beta rounds to 1 (Keras/TF compute in that dtype).

  Keras and TensorFlow cast the betas to the variable dtype: in bfloat16 `0.999` is `1.0`, so
  `1 - beta_2**t` is 0 and every step is exactly zero. Silently not training is worse than an
  error, so this raises where the framework would quietly do nothing.
  """
  dtypes = {jnp.result_type(leaf) for leaf in jax.tree.leaves(params)}
  for dtype in sorted(dtypes, key=str):
    if not jnp.issubdtype(dtype, jnp.floating):
      continue
    for name, beta in betas.items():
      if isinstance(beta, jax.core.Tracer):
        continue
      if np.any(np.asarray(np.asarray(beta, np.float64), dtype).astype(np.float64) == 1.0):
        raise ValueError(
          f"{preset} computes in the parameter dtype, as its framework does, and "
          f"{name}={beta!r} rounds to 1.0 in {dtype}, so every step would be zero. Keep "
          f"float32 parameters (as Keras mixed precision does) or use adamjax.adam, which "
          f"bias-corrects in float32."
        )


def find_state(state: Any, cls: type, remedy: str) -> Any:
  """The one instance of the state class `cls` inside an optimizer state (chains, wrappers).

  Raises:
    ValueError: naming `cls`, how many were found, and the `remedy`.
  """
  found = [
    s for s in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, cls)) if isinstance(s, cls)
  ]
  if len(found) != 1:
    raise ValueError(
      f"expected one {cls.__name__} in the optimizer state, found {len(found)}: {remedy}"
    )
  return found[0]


def path_str(path: tuple[Any, ...]) -> str:
  """A tree path as `jax.tree_util.keystr` writes it (`"<root>"` for the root)."""
  return jax.tree_util.keystr(path) or "<root>"


def paths_difference(expected: list[str], got: list[str]) -> list[str]:
  """What an error says about two trees' leaf paths: the missing and the unexpected ones."""
  detail, got_set, expected_set = [], set(got), set(expected)
  if missing := [p for p in expected if p not in got_set]:
    detail.append(f"missing {', '.join(missing[:5])}")
  if unexpected := [p for p in got if p not in expected_set]:
    detail.append(f"unexpected {', '.join(unexpected[:5])}")
  return detail


def check_updates_match(updates: Any, reference: Any, what: str = "the optimizer state") -> None:
  """Checks at trace time that `updates` has the tree structure and shapes of `reference`.

  Raises:
    ValueError: naming the first path that is missing, unexpected or mis-shaped.
    TypeError: naming the first path whose gradient is not a floating-point array.
  """
  ref_leaves, ref_def = jax.tree_util.tree_flatten_with_path(reference, is_leaf=_is_none)
  upd_leaves, upd_def = jax.tree_util.tree_flatten_with_path(updates, is_leaf=_is_none)
  if ref_def != upd_def:
    detail = paths_difference(
      sorted(path_str(p) for p, _ in ref_leaves), sorted(path_str(p) for p, _ in upd_leaves)
    )
    if not detail:
      detail.append(f"containers differ: got {upd_def}, expected {ref_def}")
    raise ValueError(
      f"gradient tree does not match {what} (built by init from the params): " + "; ".join(detail)
    )
  for (path, g), (_, r) in zip(upd_leaves, ref_leaves, strict=True):
    if g is None or r is None:
      continue
    g_shape, r_shape = jnp.shape(g), jnp.shape(r)
    if g_shape != r_shape:
      raise ValueError(
        f"gradient at {path_str(path)} has shape {g_shape}, but {what} expects {r_shape}"
      )
    g_dtype = jnp.result_type(g)
    if not jnp.issubdtype(g_dtype, jnp.inexact):
      raise TypeError(
        f"gradient at {path_str(path)} has dtype {g_dtype}; Adam needs floating-point "
        f"gradients ({what} holds {jnp.result_type(r)})"
      )
    if jnp.issubdtype(g_dtype, jnp.complexfloating) != jnp.issubdtype(
      jnp.result_type(r), jnp.complexfloating
    ):
      raise TypeError(
        f"gradient at {path_str(path)} has dtype {g_dtype}, but {what} holds {jnp.result_type(r)}"
      )
