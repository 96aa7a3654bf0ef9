"""Property tests: each formulation against a float64 NumPy transcription of its formula.

The float64 references below are the textbook formulas (Kingma & Ba Algorithm 1, and the
epsilon-hat form before its section 2.1), not adamjax's code: they share no evaluation order
with it, so they check the mathematics, while the parity tests check the rounding.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from hypothesis import given, settings
from hypothesis import strategies as st

import adamjax


def reference_adam(grads, lr, b1, b2, eps, *, eps_hat, eps_root=0.0, amsgrad=False):
  """float64 Adam; returns the update of every step. `eps_hat` selects the Keras/TF form."""
  m = np.zeros_like(grads[0], np.float64)
  v = np.zeros_like(m)
  v_max = np.zeros_like(m)
  out = []
  for t, g in enumerate(np.asarray(grads, np.float64), start=1):
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    v_max = np.maximum(v_max, v)
    v_used = v_max if amsgrad else v
    if eps_hat:
      alpha = lr * np.sqrt(1 - b2**t) / (1 - b1**t)
      out.append(-alpha * m / (np.sqrt(v_used) + eps))
    else:
      m_hat, v_hat = m / (1 - b1**t), v_used / (1 - b2**t)
      out.append(-lr * m_hat / (np.sqrt(v_hat + eps_root) + eps))
  return np.stack(out)


def updates_of(tx, grads):
  def step(state, g):
    updates, state = tx.update(g, state)
    return state, updates

  _, updates = jax.lax.scan(step, tx.init(grads[0]), grads)
  return np.asarray(updates, np.float64)


hyper = st.fixed_dictionaries(
  {
    "lr": st.floats(1e-4, 1e-1),
    "b1": st.floats(0.0, 0.99),
    "b2": st.floats(0.9, 0.9999),
    "eps": st.sampled_from([1e-8, 1e-7, 1e-6, 1e-3]),
  }
)


@st.composite
def gradient_sequences(draw):
  steps = draw(st.integers(1, 25))
  size = draw(st.integers(1, 6))
  log_scale = draw(st.floats(-8.0, 2.0))
  raw = draw(
    st.lists(
      st.floats(-1.0, 1.0, allow_subnormal=False), min_size=steps * size, max_size=steps * size
    )
  )
  return np.asarray(raw, np.float32).reshape(steps, size) * np.float32(10.0**log_scale)


def _assert_close(ours, expected, lr):
  # float32 rounding over <= 25 steps, relative to the step scale lr. The two formulations
  # differ by up to ~lr for small gradients, far outside this bound.
  np.testing.assert_allclose(ours, expected, rtol=2e-4, atol=2e-5 * lr)


settings_ = settings(max_examples=40, deadline=None)


@settings_
@given(gradient_sequences(), hyper, st.sampled_from([0.0, 1e-10]))
def test_adam_is_algorithm_1(grads, h, eps_root):
  ours = updates_of(adamjax.adam(h["lr"], h["b1"], h["b2"], h["eps"], eps_root), grads)
  expected = reference_adam(
    grads, h["lr"], h["b1"], h["b2"], h["eps"], eps_hat=False, eps_root=eps_root
  )
  _assert_close(ours, expected, h["lr"])


@settings_
@given(gradient_sequences(), hyper, st.booleans())
def test_keras_adam_is_epsilon_hat_adam(grads, h, amsgrad):
  ours = updates_of(adamjax.keras_adam(h["lr"], h["b1"], h["b2"], h["eps"], amsgrad), grads)
  expected = reference_adam(
    grads, h["lr"], h["b1"], h["b2"], h["eps"], eps_hat=True, amsgrad=amsgrad
  )
  _assert_close(ours, expected, h["lr"])


@settings_
@given(gradient_sequences(), hyper)
def test_tf1_adam_is_epsilon_hat_adam(grads, h):
  ours = updates_of(adamjax.tf1_adam(h["lr"], h["b1"], h["b2"], h["eps"]), grads)
  expected = reference_adam(grads, h["lr"], h["b1"], h["b2"], h["eps"], eps_hat=True)
  _assert_close(ours, expected, h["lr"])


def test_reference_tells_the_formulations_apart():
  # The negative control for the properties above: on tiny gradients the two forms differ by
  # far more than the tolerance, so the tests would notice a preset with the wrong form.
  grads = np.full((5, 3), 1e-8, np.float32)
  alg1 = reference_adam(grads, 1e-3, 0.9, 0.999, 1e-7, eps_hat=False)
  hat = reference_adam(grads, 1e-3, 0.9, 0.999, 1e-7, eps_hat=True)
  assert np.max(np.abs(alg1 - hat)) > 100 * 2e-5 * 1e-3
  ours = updates_of(optax.adam(1e-3, eps=1e-7), jnp.asarray(grads))
  np.testing.assert_allclose(ours, alg1, rtol=1e-5)
  assert not np.allclose(ours, hat, rtol=2e-4, atol=2e-5 * 1e-3)
