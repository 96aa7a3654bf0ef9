"""adamjax.adam against the real optax.adam: bit for bit over 1,000 steps."""

import jax.numpy as jnp
import numpy as np
import optax
import pytest
from adamjax_runner import run_optax
from reference_runners import make_gradient_sequence, make_params

import adamjax

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


@pytest.mark.parametrize("config", sorted(CONFIGS))
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_adam_equals_optax_adam_bit_for_bit(config, dtype):
  kwargs = {"learning_rate": 1e-3} | CONFIGS[config]
  params, grads = _inputs(dtype)
  ours = run_optax(adamjax.adam(**kwargs), params, grads)
  theirs = run_optax(optax.adam(**kwargs), params, grads)
  _assert_identical(ours, theirs)
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
