"""adamjax._xla_exact: each guard changes no value, and each blocks a rewrite XLA really makes.

Two kinds of test per guard. Special values (NaN payloads, signed zeros, subnormals,
infinities, the largest floats) pass unchanged, jitted and not. A canary runs the unguarded
expression under `jax.jit` on this machine's CPU and shows that XLA changes its result (a fused
multiply-add, a folded `(x + 1) - 1`, a multiplication by the reciprocal); the guarded form
equals NumPy's float32 result, operation by operation, on the same inputs.
"""

import platform
from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adamjax import _xla_exact

# float32 bit patterns: quiet NaNs with payloads (both signs), a signalling NaN, +-0, the
# smallest and largest subnormals (both signs), +-inf, +-max float, 1, the smallest normal.
_SPECIAL_F32 = np.array(
  [
    0x7FC00001,
    0xFFC12345,
    0x7F800001,
    0x00000000,
    0x80000000,
    0x00000001,
    0x007FFFFF,
    0x80000005,
    0x807FFFFF,
    0x7F800000,
    0xFF800000,
    0x7F7FFFFF,
    0xFF7FFFFF,
    0x3F800000,
    0x00800000,
  ],
  np.uint32,
).view(np.float32)

# The same kinds of value in 16 bits (float16 and bfloat16 share no_fma's int16 path).
_SPECIAL_16 = np.array(
  [0x7E01, 0xFE55, 0x7C01, 0x0000, 0x8000, 0x0001, 0x03FF, 0x8003, 0x7C00, 0xFC00, 0x7BFF],
  np.uint16,
)


def _bits(x):
  x = np.asarray(x)
  return x.view({2: np.uint16, 4: np.uint32}[x.dtype.itemsize])


def _is_subnormal(x):
  x = np.asarray(x, np.float32)
  return (x != 0) & (np.abs(x) < np.finfo(np.float32).tiny)


def _cpu_contracts_multiply_add() -> bool:
  """Whether this CPU has a fused multiply-add instruction for XLA:CPU to contract into."""
  machine = platform.machine().lower()
  if machine in ("x86_64", "amd64"):
    try:
      with open("/proc/cpuinfo") as f:
        return any(line.startswith("flags") and " fma" in line for line in f)
    except OSError:
      return True
  return True  # aarch64, ppc64le: FMA is part of the base instruction set


def _round_to_float32(exact: Fraction) -> np.float32:
  """The float32 nearest to a rational (ties to even), with no intermediate rounding."""
  guess = np.float32(float(exact))  # within an ulp; pick the nearest of it and its neighbours
  candidates = [
    np.nextafter(guess, np.float32(-np.inf)),
    guess,
    np.nextafter(guess, np.float32(np.inf)),
  ]
  return min(
    candidates,
    key=lambda f: (abs(Fraction(float(f)) - exact), int(np.array(f).view(np.uint32)) & 1),
  )


def _fma_reference(a, b, c):
  """`a * b + c` rounded once: exact rational arithmetic, then one rounding to float32."""
  return np.array(
    [
      _round_to_float32(Fraction(float(x)) * Fraction(float(y)) + Fraction(float(z)))
      for x, y, z in zip(a, b, c, strict=True)
    ],
    np.float32,
  )


def _operands(n=2000):
  """Normal float32 operands; about a quarter of `a * b + c` round differently when fused."""
  rng = np.random.default_rng(0)
  return tuple(rng.standard_normal(n).astype(np.float32) for _ in range(3))


def _on_cpu():
  return jax.default_backend() == "cpu"


# ---- opaque_zero ----


@pytest.mark.parametrize("jit", [False, True])
def test_opaque_zero_is_an_int32_zero_for_every_count(jit):
  fn = jax.jit(_xla_exact.opaque_zero) if jit else _xla_exact.opaque_zero
  for count in [0, 1, 7, 2**24, 2**31 - 1]:
    zero = fn(jnp.asarray(count, jnp.int32))
    assert zero.dtype == jnp.int32 and zero.shape == () and int(zero) == 0


@pytest.mark.skipif(not _on_cpu(), reason="the canary measures XLA:CPU")
def test_canary_a_literal_zero_is_folded_and_the_product_fuses():
  # no_fma with a zero XLA can see (a constant) is folded away: the multiply-add fuses again.
  a, b, c = _operands()
  zero = jnp.zeros([], jnp.int32)
  literal = np.asarray(jax.jit(lambda a, b, c: _xla_exact.no_fma(a * b, zero) + c)(a, b, c))
  opaque = np.asarray(
    jax.jit(lambda a, b, c, n: _xla_exact.no_fma(a * b, _xla_exact.opaque_zero(n)) + c)(
      a, b, c, jnp.int32(5)
    )
  )
  np.testing.assert_array_equal(_bits(opaque), _bits(a * b + c))
  if _cpu_contracts_multiply_add():
    np.testing.assert_array_equal(_bits(literal), _bits(_fma_reference(a, b, c)))
    assert np.any(literal != a * b + c)
  else:  # no FMA instruction here: nothing to fuse, so both are the separately rounded sum
    np.testing.assert_array_equal(_bits(literal), _bits(a * b + c))


# ---- no_fma ----


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_no_fma_passes_special_values_bit_for_bit(dtype, jit):
  if dtype == "float32":
    x = jnp.asarray(_SPECIAL_F32)
  else:
    x = jax.lax.bitcast_convert_type(jnp.asarray(_SPECIAL_16), jnp.dtype(dtype))
  expected = _bits(x)

  def guarded(x, count):
    return _xla_exact.no_fma(x, _xla_exact.opaque_zero(count))

  def through_maker(x, count):
    return _xla_exact.make_no_fma(count)(x)

  for fn in (guarded, through_maker):
    fn = jax.jit(fn) if jit else fn
    out = fn(x, jnp.int32(3))
    assert out.dtype == x.dtype
    np.testing.assert_array_equal(_bits(out), expected)
  off = _xla_exact.make_no_fma(jnp.int32(3), enabled=False)
  assert off(x) is x


@pytest.mark.skipif(not _on_cpu(), reason="the canary measures XLA:CPU")
def test_canary_xla_fuses_a_multiply_add_that_no_fma_keeps_apart():
  a, b, c = _operands()
  separate = a * b + c  # NumPy: the product is rounded, then the sum
  fused_ref = _fma_reference(a, b, c)
  plain = np.asarray(jax.jit(lambda a, b, c: a * b + c)(a, b, c))

  def guarded(a, b, c, count):
    return _xla_exact.make_no_fma(count)(a * b) + c

  for fn in (guarded, jax.jit(guarded)):
    np.testing.assert_array_equal(_bits(fn(a, b, c, jnp.int32(0))), _bits(separate))
  if _cpu_contracts_multiply_add():
    # Without the guard XLA's result is the once-rounded a*b+c, on about a quarter of inputs
    # not the separately rounded one.
    np.testing.assert_array_equal(_bits(plain), _bits(fused_ref))
    assert 0.1 < np.mean(plain != separate) < 0.5
    # The tools that look like they should block it do not.
    for blocker in (
      jax.lax.optimization_barrier,
      lambda p: jax.lax.reduce_precision(p, exponent_bits=8, mantissa_bits=23),
    ):
      tried = np.asarray(jax.jit(lambda a, b, c: blocker(a * b) + c)(a, b, c))  # noqa: B023
      np.testing.assert_array_equal(_bits(tried), _bits(fused_ref))
    # enabled=False (fused_multiply_add=True in the presets) lets XLA fuse.
    off = jax.jit(lambda a, b, c, n: _xla_exact.make_no_fma(n, enabled=False)(a * b) + c)
    np.testing.assert_array_equal(_bits(off(a, b, c, jnp.int32(0))), _bits(fused_ref))
  else:  # no FMA instruction on this CPU: the plain form already rounds separately
    np.testing.assert_array_equal(_bits(plain), _bits(separate))


@pytest.mark.skipif(not _on_cpu(), reason="the canary measures XLA:CPU")
def test_canary_xla_folds_x_plus_one_minus_one_that_no_fma_keeps():
  # TwoSum recovers a sum's rounding error as `(s - a) - b`; XLA's simplifier folds
  # `(x + 1) - 1` to `x`, which would make that error vanish.
  x = _operands()[0] * np.float32(1e-4)
  rounded_sum = (x + np.float32(1)) - np.float32(1)  # NumPy: x to 2**-23 absolute
  assert np.all(rounded_sum != x)
  plain = np.asarray(jax.jit(lambda x: (x + 1.0) - 1.0)(x))
  np.testing.assert_array_equal(_bits(plain), _bits(x))  # the rounding is gone

  def guarded(x, count):
    return _xla_exact.make_no_fma(count)(x + 1.0) - 1.0

  for fn in (guarded, jax.jit(guarded)):
    np.testing.assert_array_equal(_bits(fn(x, jnp.int32(0))), _bits(rounded_sum))


# ---- no_reciprocal_divide ----


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("divisor", [1.0, -2.0, 3.0, 0.1, np.inf, 0.0])
def test_no_reciprocal_divide_of_special_values_is_the_ieee_quotient(divisor, jit):
  x = _SPECIAL_F32
  fn = jax.jit(_xla_exact.no_reciprocal_divide) if jit else _xla_exact.no_reciprocal_divide
  out = np.asarray(fn(jnp.asarray(x), divisor))
  assert out.dtype == np.float32
  with np.errstate(all="ignore"):
    expected = x / np.float32(divisor)
  # XLA:CPU flushes subnormal operands and results to zero (keeping the sign), guarded or not:
  # it divides in flush-to-zero mode. Every other value, NaN payloads included, is NumPy's.
  flushed = _is_subnormal(x) | _is_subnormal(expected)
  np.testing.assert_array_equal(_bits(out[~flushed]), _bits(expected[~flushed]))
  if _on_cpu():
    with np.errstate(all="ignore"):
      ftz = np.where(_is_subnormal(x), np.copysign(np.float32(0), x), x) / np.float32(divisor)
    ftz = np.where(_is_subnormal(ftz), np.copysign(np.float32(0), ftz), ftz)
    np.testing.assert_array_equal(_bits(out[flushed]), _bits(ftz[flushed]))
  # A NaN dividend keeps its payload (quieted), as NumPy's and TensorFlow's division keeps it.
  assert _bits(out[:2]).tolist() == [0x7FC00001, 0xFFC12345]


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_no_reciprocal_divide_casts_the_divisor_to_the_dividend_dtype(dtype):
  x = jnp.asarray([1.0, 2.0, 5.0], dtype)
  out = _xla_exact.no_reciprocal_divide(x, jnp.asarray(3.0, jnp.float32))
  assert out.dtype == dtype
  expected = np.asarray(x, np.float32) / np.float32(np.asarray(jnp.asarray(3.0, dtype)))
  np.testing.assert_array_equal(np.asarray(out), np.asarray(jnp.asarray(expected, dtype)))


@pytest.mark.skipif(not _on_cpu(), reason="the canary measures XLA:CPU")
@pytest.mark.parametrize("divisor", [3.0, 7.0, 0.1, 1000.0])
def test_canary_xla_divides_by_a_scalar_as_a_reciprocal_multiply(divisor):
  x = _operands()[0]
  d = np.float32(divisor)
  expected = x / d  # NumPy: correctly rounded float32 division
  constant = np.asarray(jax.jit(lambda x: x / divisor)(x))
  broadcast = np.asarray(jax.jit(lambda x, s: x / s)(x, d))
  eager = np.asarray(jnp.asarray(x) / divisor)
  for plain in (constant, broadcast, eager):
    np.testing.assert_array_equal(_bits(plain), _bits(x * (np.float32(1) / d)))
    assert np.any(plain != expected)
  guarded = [
    _xla_exact.no_reciprocal_divide(jnp.asarray(x), divisor),
    jax.jit(lambda x: _xla_exact.no_reciprocal_divide(x, divisor))(x),
    jax.jit(_xla_exact.no_reciprocal_divide)(x, d),
  ]
  for out in guarded:
    np.testing.assert_array_equal(_bits(out), _bits(expected))
