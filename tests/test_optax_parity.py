"""adamjax.adam against the real optax.adam: bit for bit over 1,000 steps."""

import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adamjax
from adamjax.testing import make_gradient_sequence, make_params, run_optax

SHAPES = {"bias": (7,), "kernel": (3, 5), "conv": (2, 3, 4), "scale": ()}
STEPS = 1000

CONFIGS = {
  "default": {},
  "eps_root": {"eps_root": 1e-8},
  "nesterov": {"nesterov": True},
  "mu_bf16": {"mu_dtype": jnp.bfloat16},
  "betas_eps": {"b1": 0.8, "b2": 0.99, "eps": 1e-6},
  "schedule": {"learning_rate": optax.cosine_decay_schedule(1e-2, 800)},
}
# optax's default eps=1e-8 is 0 in float16, and a gradient whose square underflows then gives
# 0/0: the float16 rows use an epsilon float16 holds, so that they compare numbers, not NaNs
# (test_float16_default_eps_gives_the_documented_nan shows the other case on purpose).
FLOAT16_EPS = 1e-4


def _inputs(dtype, seed=0):
  params = {k: v.astype(dtype) for k, v in make_params(SHAPES, seed).items()}
  grads = {k: v.astype(dtype) for k, v in make_gradient_sequence(SHAPES, STEPS, seed + 1).items()}
  return params, grads


def _assert_identical(ours, theirs):
  for field in theirs:
    for name in theirs[field]:
      np.testing.assert_array_equal(
        ours[field][name], theirs[field][name], err_msg=f"{field}[{name!r}]"
      )


def _finite_share(tree):
  leaves = [np.isfinite(np.asarray(v, np.float32)).ravel() for v in tree.values()]
  return float(np.mean(np.concatenate(leaves)))


def test_float16_default_eps_gives_the_documented_nan():
  """With float16 parameters optax's default eps (1e-8) is 0: a gradient whose square
  underflows divides 0 by 0, in optax and in adamjax alike (the warning in adam's docstring)."""
  params, grads = _inputs(jnp.float16)
  ours = run_optax(adamjax.adam(1e-3), params, grads)
  theirs = run_optax(optax.adam(1e-3), params, grads)
  _assert_identical(ours, theirs)
  share = _finite_share(ours["params"])
  assert 0.0 < share < 0.9, share  # most elements are NaN or inf from the first step
  assert _finite_share(run_optax(adamjax.adam(1e-3, eps=FLOAT16_EPS), params, grads)["params"]) == 1


@pytest.mark.parametrize("config", sorted(CONFIGS))
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_adam_equals_optax_adam_bit_for_bit(config, dtype):
  kwargs = {"learning_rate": 1e-3} | CONFIGS[config]
  if dtype == jnp.float16 and "eps" not in kwargs:
    kwargs["eps"] = FLOAT16_EPS
  params, grads = _inputs(dtype)
  ours = run_optax(adamjax.adam(**kwargs), params, grads)
  theirs = run_optax(optax.adam(**kwargs), params, grads)
  _assert_identical(ours, theirs)
  # Bit-identical numbers, not NaN == NaN: every parameter is finite at every step.
  assert _finite_share(ours["params"]) == 1.0
  # Not vacuous: parameters moved, and the state holds the dtypes optax documents.
  assert np.any(ours["params"]["kernel"][-1] != params["kernel"])
  assert ours["mu"]["kernel"].dtype == (kwargs.get("mu_dtype") or dtype)
  assert ours["nu"]["kernel"].dtype == dtype


def test_adam_equals_optax_adam_eagerly():
  params, grads = _inputs(jnp.float32)
  grads = {k: v[:150] for k, v in grads.items()}
  for kwargs in ({}, {"nesterov": True}):
    ours = run_optax(adamjax.adam(1e-3, **kwargs), params, grads, jit=False)
    theirs = run_optax(optax.adam(1e-3, **kwargs), params, grads, jit=False)
    _assert_identical(ours, theirs)


def test_scale_by_adam_equals_optax_in_a_chain():
  params, grads = _inputs(jnp.float32)
  chain = lambda scale_by_adam: optax.chain(  # noqa: E731
    optax.clip_by_global_norm(10.0), scale_by_adam(b1=0.95), optax.scale(-3e-4)
  )
  _assert_identical(
    run_optax(chain(adamjax.scale_by_adam), params, grads),
    run_optax(chain(optax.scale_by_adam), params, grads),
  )


@pytest.mark.parametrize(
  "kwargs",
  [{}, {"weight_decay": 1e-2, "nesterov": True}, {"mask": lambda p: {k: k != "bias" for k in p}}],
)
def test_adamw_equals_optax_adamw_bit_for_bit(kwargs):
  params, grads = _inputs(jnp.float32)
  _assert_identical(
    run_optax(adamjax.adamw(1e-3, **kwargs), params, grads),
    run_optax(optax.adamw(1e-3, **kwargs), params, grads),
  )
