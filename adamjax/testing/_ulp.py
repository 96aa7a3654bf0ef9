"""Distances between float arrays in units in the last place, and the largest over two trees."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

_INT_FOR_FLOAT = {"float16": np.int16, "bfloat16": np.int16, "float32": np.int32}


def _ordered_bits(x: np.ndarray) -> np.ndarray:
  """Map floats to int64 so that consecutive floats are consecutive integers (+0 = -0 = 0)."""
  itype = _INT_FOR_FLOAT[x.dtype.name]
  # ascontiguousarray makes a 0-d array 1-d: reshape back.
  bits = np.ascontiguousarray(x).view(itype).reshape(x.shape).astype(np.int64)
  magnitude = bits & (2 ** (8 * x.dtype.itemsize - 1) - 1)
  return np.where(bits < 0, -magnitude, magnitude)


def ulp_distance(a: Any, b: Any) -> np.ndarray:
  """Elementwise distance in units in the last place between two float arrays.

  The number of representable values between `a` and `b` (float32, float16 or bfloat16, both
  the same dtype), counted across zero and across signs: 0 for identical values (and for +0 vs
  -0), 1 for `np.nextafter` neighbours, 2 between the smallest positive and negative subnormals.
  Two NaNs are 0 apart; a NaN and a non-NaN are `np.iinfo(np.int64).max` apart. Infinities sit
  one past the largest finite value.

  Args:
    a, b: arrays (or scalars) of one dtype that broadcast together.

  Returns:
    int64 array of the broadcast shape.

  Raises:
    TypeError: the dtypes differ or are not float32, float16 or bfloat16.

  >>> import numpy as np
  >>> one = np.float32(1.0)
  >>> int(ulp_distance(one, np.nextafter(one, np.float32(2))))
  1
  >>> int(ulp_distance(np.float32(-0.0), np.float32(0.0)))
  0
  """
  a = np.asarray(a)
  b = np.asarray(b)
  if a.dtype != b.dtype:
    raise TypeError(f"ulp_distance needs equal dtypes, got {a.dtype} and {b.dtype}")
  if a.dtype.name not in _INT_FOR_FLOAT:
    raise TypeError(f"ulp_distance supports {sorted(_INT_FOR_FLOAT)}, got {a.dtype}")
  a, b = np.broadcast_arrays(a, b)
  dist = np.abs(_ordered_bits(a) - _ordered_bits(b))
  a_nan = np.isnan(a.astype(np.float32))
  b_nan = np.isnan(b.astype(np.float32))
  dist = np.where(a_nan & b_nan, 0, dist)
  return np.where(a_nan ^ b_nan, np.iinfo(np.int64).max, dist).astype(np.int64)


def _leaf_pairs(a: Any, b: Any) -> list[tuple[np.ndarray, np.ndarray]]:
  """The leaves of two trees of one structure, paired (a clear error when the structures differ)."""
  pairs: list[tuple[np.ndarray, np.ndarray]] = []
  jax.tree.map(lambda x, y: pairs.append((np.asarray(x), np.asarray(y))), a, b)
  return pairs


def max_ulps(a: Any, b: Any) -> int:
  """Largest :func:`ulp_distance` over every element of two trees of arrays (0 for empty ones).

  `a` and `b` are pytrees of the same structure (dicts of arrays, say), leaf dtypes equal.

  >>> import numpy as np
  >>> x = np.array([1.0, 2.0], np.float32)
  >>> max_ulps({"w": x}, {"w": np.nextafter(x, np.float32(3))})
  1
  """
  return max((int(ulp_distance(x, y).max(initial=0)) for x, y in _leaf_pairs(a, b)), default=0)


def max_abs_diff(a: Any, b: Any) -> float:
  """Largest absolute difference, in float64, over every element of two trees of arrays."""
  return max(
    (
      float(np.max(np.abs(x.astype(np.float64) - y.astype(np.float64)), initial=0.0))
      for x, y in _leaf_pairs(a, b)
    ),
    default=0.0,
  )
