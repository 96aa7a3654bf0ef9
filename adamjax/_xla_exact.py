"""Guards that keep XLA from changing float32 results: each blocks one rewrite, and costs ~nothing.

TensorFlow's CPU kernels, Keras run op by op and PyTorch's kernels round every operation as
written. Under `jax.jit` XLA may legally do otherwise, and on CPU it does (the canaries in
`tests/test_xla_exact.py` show each rewrite on the machine that runs them):

- it contracts `a * b + c` into one fused multiply-add, rounded once (:func:`no_fma`);
- it simplifies arithmetic it can see through, such as `(a + b) - a` to `b`, which is what
  error-free transformations (TwoSum) must not lose (:func:`no_fma` again);
- it divides by a constant or a broadcast scalar as a multiplication by the reciprocal, one ulp
  off for about a third of quotients (:func:`no_reciprocal_divide`).

`lax.optimization_barrier` and `lax.reduce_precision` do not stop contraction: the multiply-add
is formed by LLVM, after both are gone. The guards below are identities XLA and LLVM cannot
prove to be identities, so they must keep the value as written.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

__all__ = ["Guard", "make_no_fma", "no_fma", "no_reciprocal_divide", "opaque_zero"]

Guard = Callable[[jax.Array], jax.Array]  # `make_no_fma(count)`: x -> no_fma(x, zero)

_SAME_WIDTH_INT = {2: jnp.int16, 4: jnp.int32, 8: jnp.int64}


def opaque_zero(count: jax.Array) -> jax.Array:
  """An int32 zero computed at run time: `min(count, 0)` for a step count `count >= 0`.

  Without it, a zero written in the program (`jnp.zeros([], jnp.int32)`) is a constant: XLA
  folds `bits | 0` to `bits`, and :func:`no_fma` blocks nothing. A step counter is never
  negative, but no compiler can know that, so this zero stays opaque.
  """
  return jnp.minimum(jnp.asarray(count, jnp.int32), 0)


def no_fma(x: jax.Array, zero: jax.Array) -> jax.Array:
  """Returns `x` bit for bit, as a value XLA cannot fuse into a multiply-add or simplify away.

  Without it, under `jax.jit` XLA's CPU and GPU backends contract `a * b + c` into one fused
  multiply-add with a single rounding, where TensorFlow, Keras op by op and PyTorch's scalar
  kernels round the product first: the results drift by ulps that compound over steps. XLA's
  simplifier also rewrites `(a + b) - a` to `b`, which erases the rounding error that TwoSum
  recovers. `x` passes through an integer OR with `zero`, an int32 zero known only at run time
  (:func:`opaque_zero`): an identity no compiler can prove, so `x` is rounded and kept as it is
  before anything consumes it. No value changes, not even a NaN's payload; it costs one integer
  OR per element in a memory-bound kernel.
  """
  dtype = jnp.result_type(x)
  int_dtype = _SAME_WIDTH_INT[jnp.dtype(dtype).itemsize]
  bits = jax.lax.bitcast_convert_type(x, int_dtype)
  return jax.lax.bitcast_convert_type(bits | zero.astype(int_dtype), dtype)


def make_no_fma(count: jax.Array, enabled: bool = True) -> Guard:
  """`x -> no_fma(x, opaque_zero(count))` if `enabled`, else the identity (XLA may fuse)."""
  if not enabled:
    return lambda x: x
  zero = opaque_zero(count)
  return lambda x: no_fma(x, zero)


def no_reciprocal_divide(x: jax.Array, divisor: Any) -> jax.Array:
  """`x / divisor` correctly rounded, as TensorFlow and PyTorch divide, for a scalar `divisor`.

  Without it, XLA compiles a division by a constant or by a broadcast scalar (even op by op, as
  `x / 3.0` outside `jit`) as a multiplication by the reciprocal, which is an ulp off for about
  a third of quotients when the divisor is not a power of two. Here the divisor becomes
  `where(isnan(x), x, divisor)`: elementwise, so XLA cannot see a broadcast, and equal to the
  divisor wherever `x` is not NaN (where `x` is NaN the quotient is `x`'s NaN either way). The
  divisor is cast to `x`'s dtype first, as a scalar operand of TensorFlow's kernels is.
  """
  divisor = jnp.asarray(divisor, jnp.result_type(x))
  return x / jnp.where(jnp.isnan(x), x, divisor)
