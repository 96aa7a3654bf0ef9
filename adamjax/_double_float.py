"""Double-float arithmetic from float32 operations: float64 scalars and FMA where JAX has neither.

JAX without x64 has no float64 and no FMA primitive, but PyTorch's Adam needs both: its bias
corrections are float64 powers of the exact double betas, and its CPU kernels fuse multiply-adds.
These give them exactly from float32 operations: error-free sums and products (Knuth, Dekker),
double-float `(hi, lo)` pairs good to ~48 bits, and Boldo & Melquiond's emulated FMA.

`r` is `_xla_exact.make_no_fma(count)`: every product that is added goes through it, so XLA's
contraction cannot change it, and so does every sum whose rounding error is recovered, since
XLA's simplifier rewrites `(x + 1) - 1` to `x`.
"""

from __future__ import annotations

import decimal
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from adamjax._xla_exact import Guard

__all__ = [
  "DoubleFloat",
  "div_to_f32",
  "fast_two_sum",
  "fma",
  "from_number",
  "mul",
  "one_minus_power",
  "power_tables",
  "split",
  "sqrt_to_f32",
  "two_prod",
  "two_sum",
]

DoubleFloat = tuple[jax.Array, jax.Array]  # (hi, lo) float32 pair: hi + lo to ~48 bits


def two_sum(r: Guard, a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
  """`a + b == s + e` exactly (Knuth's TwoSum)."""
  s = r(a + b)
  bb = r(s - a)
  return s, (a - (s - bb)) + (b - bb)


def fast_two_sum(r: Guard, a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
  """`a + b == s + e` exactly, for `|a| >= |b|` (Dekker's FastTwoSum)."""
  s = r(a + b)
  return s, b - (s - a)


def split(a: jax.Array) -> tuple[jax.Array, jax.Array]:
  """`a == hi + lo` exactly, each with at most 12 significant bits (masking, not Veltkamp)."""
  bits = jax.lax.bitcast_convert_type(a, jnp.uint32) & np.uint32(0xFFFFF000)
  hi = jax.lax.bitcast_convert_type(bits, jnp.float32)
  return hi, a - hi


def two_prod(r: Guard, a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
  """`a * b == p + e` exactly (Dekker) in the normal range; the partial products are exact."""
  p = r(a * b)
  ah, al = split(a)
  bh, bl = split(b)
  return p, ((ah * bh - p) + ah * bl + al * bh) + al * bl


def fma(r: Guard, a: jax.Array, b: jax.Array, c: jax.Array) -> jax.Array:
  """`a * b + c` rounded once, as the FMA instruction in PyTorch's CPU kernels rounds it.

  Boldo & Melquiond's emulation: with `a*b = uh + ul` and `c + uh = th + tl` exactly,
  `RN(th + RO(tl + ul))` is the correctly rounded result, where RO rounds to odd (emulated here
  from an exact sum: an inexact, even result moves one step toward the lost bits). Exact for
  operands and results in the normal float32 range; non-finite cases fall back to `a*b + c`.
  """
  uh, ul = two_prod(r, a, b)
  th, tl = two_sum(r, c, uh)
  v, err = two_sum(r, tl, ul)
  bits = jax.lax.bitcast_convert_type(v, jnp.int32)
  toward = jnp.where((bits ^ jax.lax.bitcast_convert_type(err, jnp.int32)) >= 0, 1, -1)
  keep = (err == 0) | ((bits & 1) == 1)
  odd = jax.lax.bitcast_convert_type(jnp.where(keep, bits, bits + toward), jnp.float32)
  z = th + odd
  return jnp.where(jnp.isfinite(z), z, r(a * b) + c)


def from_number(x: Any) -> tuple[jax.Array, jax.Array]:
  """A hyperparameter as a double-float `(hi, lo)`: a Python double exactly to 48 bits, or a
  traced float32 value as itself (PyTorch then computes with that float32 value as its lr)."""
  if isinstance(x, (int, float, np.floating, np.integer)):
    hi = np.float32(x)
    return jnp.asarray(hi), jnp.asarray(np.float32(float(x) - float(hi)))
  x = jnp.asarray(x, jnp.float32)
  return x, jnp.zeros([], jnp.float32)


def mul(r: Guard, a: DoubleFloat, b: DoubleFloat) -> DoubleFloat:
  p, e = two_prod(r, a[0], b[0])
  return fast_two_sum(r, p, e + (r(a[0] * b[1]) + r(a[1] * b[0])))


def div_to_f32(r: Guard, a: DoubleFloat, b: DoubleFloat) -> jax.Array:
  """`a / b` rounded to float32 (one Newton correction of the float32 quotient)."""
  q = a[0] / b[0]
  p, e = two_prod(r, q, b[0])
  return q + ((((a[0] - p) - e) + a[1]) - r(q * b[1])) / b[0]


def sqrt_to_f32(r: Guard, a: DoubleFloat) -> jax.Array:
  """`sqrt(a)` rounded to float32 (one Newton correction of the float32 root)."""
  s = jnp.sqrt(a[0])
  p, e = two_prod(r, s, s)
  return s + (((a[0] - p) - e) + a[1]) / (s + s)


@functools.cache
def power_tables(beta: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """`beta**(d * 256**k)` as float32 `(hi, lo)` rows for digits d, computed in 60 digits.

  `beta` is the exact double PyTorch raises to the step (no float32 rounding of the beta).
  Level 2 has 257 rows so that step 2**24 (256 * 65536) is covered.
  """
  ctx = decimal.Context(prec=60, Emin=-(10**9))
  tables = []
  for k, rows in enumerate((256, 256, 257)):
    base = ctx.power(decimal.Decimal(beta), 256**k)
    x, out = decimal.Decimal(1), np.zeros((rows, 2), np.float32)
    for d in range(rows):
      hi = np.float32(float(x))
      out[d] = hi, np.float32(float(ctx.subtract(x, decimal.Decimal(float(hi)))))
      x = ctx.multiply(x, base)
    tables.append(out)
  return tuple(tables)


def one_minus_power(r: Guard, beta: float, step: jax.Array) -> DoubleFloat:
  """`1 - beta**step` as a double-float, to the bits float64 gives (PyTorch's bias corrections).

  `beta` is an exact double and `step` an int32 in [0, 2**24].

  Three table look-ups (base-256 digits of the step) and two double-float products: about 45
  correct bits, so rounding the derived scalars to float32 gives the bits float64 gives.
  """
  t0, t1, t2 = power_tables(beta)
  row = lambda table, d: (jnp.asarray(table)[d, 0], jnp.asarray(table)[d, 1])  # noqa: E731
  power = mul(r, mul(r, row(t0, step & 255), row(t1, (step >> 8) & 255)), row(t2, step >> 16))
  s, e = two_sum(r, jnp.ones([], jnp.float32), -power[0])
  return fast_two_sum(r, s, e - power[1])
