"""Adam with optax semantics (Algorithm 1 of Kingma & Ba): a drop-in for `optax.adam`."""

# No `from __future__ import annotations`: optax's tools read `learning_rate`'s annotation at
# run time (`optax.ScalarOrSchedule` marks a preset that takes a schedule).
from typing import Any

import jax
import jax.numpy as jnp
import optax

from adamjax import _common

# The same state class as optax, so states (and checkpoints) of `adamjax.adam` and `optax.adam`
# are interchangeable and `optax.tree_utils.tree_get(state, "count")` works.
ScaleByAdamState = optax.ScaleByAdamState


# ---- per-leaf arithmetic, in optax's evaluation order (optax/_src/transform.py) ----


def _first_moment(g: jax.Array, mu: jax.Array, b1: Any) -> jax.Array:
  return (1 - b1) * g + b1 * mu


def _second_moment(g: jax.Array, nu: jax.Array, b2: Any) -> jax.Array:
  g2 = (jnp.conj(g) * g).real if jnp.iscomplexobj(g) else g**2
  return (1 - b2) * g2 + b2 * nu


def scale_by_adam(
  b1: jax.typing.ArrayLike = 0.9,
  b2: jax.typing.ArrayLike = 0.999,
  eps: jax.typing.ArrayLike = 1e-8,
  eps_root: jax.typing.ArrayLike = 0.0,
  mu_dtype: Any | None = None,
  *,
  nesterov: bool = False,
) -> optax.GradientTransformation:
  r"""Rescales updates by Adam's bias-corrected moment ratio, as `optax.scale_by_adam`.

  .. math::
    m_t = (1-\beta_1) g_t + \beta_1 m_{t-1}, \quad v_t = (1-\beta_2) g_t^2 + \beta_2 v_{t-1},\\
    \hat m_t = m_t / (1-\beta_1^t), \quad \hat v_t = v_t / (1-\beta_2^t),\quad
    u_t = \hat m_t / (\sqrt{\hat v_t + \bar\varepsilon} + \varepsilon).

  The result is the positive direction; the learning rate and sign come after (see
  :func:`adamjax.adam`). Results are bit-identical to `optax.scale_by_adam` on CPU.

  Hyperparameters are what optax accepts: Python numbers, NumPy or JAX scalars of any floating
  dtype (bfloat16 from `optax.inject_hyperparams` included), tracers, and arrays that broadcast
  against the leaves.

  Args:
    b1: Decay rate of the first moment, in [0, 1).
    b2: Decay rate of the second moment, in [0, 1).
    eps: Added to the denominator outside the square root (Algorithm 1's epsilon), >= 0.
    eps_root: Added inside the square root, >= 0; useful when differentiating through Adam.
    mu_dtype: Optional dtype of the first moment (for example `jnp.bfloat16`); the second
      moment always has the dtype of the parameters.
    nesterov: Use Nesterov momentum (NAdam as optax defines it, Dozat 2016).

  Returns:
    An `optax.GradientTransformation` whose state is `ScaleByAdamState(count, mu, nu)`.

  Raises:
    ValueError: naming the argument and its value, where a concrete value is NaN, infinite,
      a beta outside [0, 1) (1 divides by a zero bias correction), or a negative epsilon
      (a zero or negative denominator), where optax would compute NaN or nonsense silently.
    TypeError: at `update`, for integer gradients: optax casts the second moment of an integer
      parameter back to integers (every step then divides by `eps`) and truncates the
      parameters, so adamjax refuses them.

  Example:
    >>> import adamjax, jax.numpy as jnp, optax
    >>> tx = optax.chain(adamjax.scale_by_adam(), optax.scale(-1e-3))
    >>> params = {"w": jnp.ones(3)}
    >>> state = tx.init(params)
    >>> updates, state = tx.update({"w": jnp.full(3, 0.5)}, state)
    >>> print(updates["w"])  # the first step is -lr * g / (|g| + eps)
    [-0.00099999 -0.00099999 -0.00099999]

  References:
    Kingma & Ba, `Adam: A Method for Stochastic Optimization <https://arxiv.org/abs/1412.6980>`_,
    2015; `optax.scale_by_adam`.
  """
  _common.check_hyperparameter("b1", b1, low=0.0, high=1.0)
  _common.check_hyperparameter("b2", b2, low=0.0, high=1.0)
  _common.check_hyperparameter("eps", eps, low=0.0)
  _common.check_hyperparameter("eps_root", eps_root, low=0.0)
  mu_dtype = jax.dtypes.canonicalize_dtype(mu_dtype) if mu_dtype is not None else None

  def init_fn(params):
    mu = optax.tree.zeros_like(params, dtype=mu_dtype)
    nu = optax.tree.zeros_like(params)
    return ScaleByAdamState(count=jnp.zeros([], jnp.int32), mu=mu, nu=nu)

  def update_fn(updates, state, params=None):
    del params
    _common.check_updates_match(updates, state.nu)
    mu = _common.tree_map_leaves(lambda g, m: _first_moment(g, m, b1), updates, state.mu)
    nu = _common.tree_map_leaves(lambda g, v: _second_moment(g, v, b2), updates, state.nu)
    count_inc = _common.safe_increment(state.count)
    # optax's own bias correction, so results round exactly as optax's do, eager or jitted: it
    # is a jitted, inlined tree function, and how XLA compiles `moment / (1 - b**t)` (for
    # instance, `b**t` as `pow` rather than repeated multiplication when run eagerly) is part
    # of the bits. It also computes `1 - b**t` in full precision before casting, which keeps
    # bfloat16 from dividing by zero.
    if nesterov:
      mu_hat = _common.tree_map_leaves(
        lambda m, g: b1 * m + (1 - b1) * g,
        optax.tree.bias_correction(mu, b1, _common.safe_increment(count_inc)),
        optax.tree.bias_correction(updates, b1, count_inc),
      )
    else:
      mu_hat = optax.tree.bias_correction(mu, b1, count_inc)
    nu_hat = optax.tree.bias_correction(nu, b2, count_inc)
    updates = _common.tree_map_leaves(
      lambda m, v: m / (jnp.sqrt(v + eps_root) + eps), mu_hat, nu_hat
    )
    mu = optax.tree.cast(mu, mu_dtype)
    nu = optax.tree.cast_like(nu, state.nu)
    return updates, ScaleByAdamState(count=count_inc, mu=mu, nu=nu)

  return optax.GradientTransformation(init_fn, update_fn)


def adam(
  learning_rate: optax.ScalarOrSchedule,
  b1: jax.typing.ArrayLike = 0.9,
  b2: jax.typing.ArrayLike = 0.999,
  eps: jax.typing.ArrayLike = 1e-8,
  eps_root: jax.typing.ArrayLike = 0.0,
  mu_dtype: Any | None = None,
  *,
  nesterov: bool = False,
) -> optax.GradientTransformation:
  r"""Adam with optax semantics: a drop-in replacement for `optax.adam`.

  Algorithm 1 of Kingma & Ba: :math:`\theta_t = \theta_{t-1} - \alpha\,\hat m_t /
  (\sqrt{\hat v_t + \bar\varepsilon} + \varepsilon)`, with the moments of
  :func:`adamjax.scale_by_adam`. Bit-identical to `optax.adam` on CPU (tested over 1,000 steps
  for float32, bfloat16 and float16 parameters, `mu_dtype`, `eps_root` and `nesterov`), and the
  state is the same pytree, so the two are interchangeable mid-run.

  .. warning::
    This `eps` is Algorithm 1's epsilon, added to the bias-corrected root. Keras and TensorFlow
    add their epsilon ("epsilon hat") to the *uncorrected* root, so `adam(eps=1e-7)` is not
    Keras's Adam: for small gradients their steps differ by orders of magnitude early in
    training. Use :func:`adamjax.keras_adam` or :func:`adamjax.tf1_adam` to match those.

  .. warning::
    With float16 parameters the default `eps=1e-8` rounds to 0, and a zero gradient then
    gives 0/0 = NaN, exactly as in `optax.adam`. Use `eps >= 6e-8` for float16.

  Args:
    learning_rate: A float or an `optax.Schedule` evaluated at the 0-based step count. Negative
      values ascend, as in optax.
    b1: Decay rate of the first moment.
    b2: Decay rate of the second moment.
    eps: Added to the denominator outside the square root.
    eps_root: Added inside the square root.
    mu_dtype: Optional dtype of the first moment.
    nesterov: Use Nesterov momentum (optax's NAdam).

  Returns:
    An `optax.GradientTransformation`, a chain of :func:`scale_by_adam` and
    `optax.scale_by_learning_rate`, exactly as `optax.adam` is built.

  Example:
    >>> import adamjax, jax, jax.numpy as jnp, optax
    >>> tx = adamjax.adam(learning_rate=0.1)
    >>> params = jnp.array([1.0, -2.0])
    >>> state = tx.init(params)
    >>> for _ in range(100):
    ...   grads = jax.grad(lambda p: jnp.sum(p**2))(params)
    ...   updates, state = tx.update(grads, state, params)
    ...   params = optax.apply_updates(params, updates)
    >>> bool(jnp.all(jnp.abs(params) < 0.1))
    True

  References:
    Kingma & Ba, `Adam: A Method for Stochastic Optimization <https://arxiv.org/abs/1412.6980>`_,
    2015; `optax.adam`.
  """
  _common.check_hyperparameter("learning_rate", learning_rate, allow_schedule=True)
  return optax.chain(
    scale_by_adam(b1, b2, eps, eps_root, mu_dtype, nesterov=nesterov),
    optax.scale_by_learning_rate(learning_rate),
  )


def adamw(
  learning_rate: optax.ScalarOrSchedule,
  b1: jax.typing.ArrayLike = 0.9,
  b2: jax.typing.ArrayLike = 0.999,
  eps: jax.typing.ArrayLike = 1e-8,
  eps_root: jax.typing.ArrayLike = 0.0,
  mu_dtype: Any | None = None,
  weight_decay: optax.ScalarOrSchedule = 1e-4,
  mask: Any | None = None,
  *,
  nesterov: bool = False,
) -> optax.GradientTransformation:
  r"""AdamW with optax semantics: a drop-in replacement for `optax.adamw`.

  The decay is added to Adam's direction before the learning rate scales both,
  :math:`\theta \leftarrow \theta - \eta\,(\hat m/(\sqrt{\hat v}+\varepsilon) + \lambda\theta)`:
  decoupled from the moments (Loshchilov & Hutter), but scaled by the learning rate. Keras's
  AdamW rounds differently (it decays the weights before the step): use
  :func:`adamjax.keras_adamw` to match Keras, :func:`adamjax.torch_adamw` for PyTorch.

  Args:
    learning_rate: A float or a schedule.
    b1: Decay rate of the first moment.
    b2: Decay rate of the second moment.
    eps: Added to the denominator outside the square root.
    eps_root: Added inside the square root.
    mu_dtype: Optional dtype of the first moment.
    weight_decay: The decay rate :math:`\lambda` (a float or a schedule; negative values are
      accepted, as in optax).
    mask: An optax mask (tree of booleans, or a callable of the params) of the decayed leaves.
    nesterov: Use Nesterov momentum.

  Returns:
    An `optax.GradientTransformation` built as `optax.adamw` is (bit-identical results).

  Example:
    >>> import adamjax, jax.numpy as jnp
    >>> tx = adamjax.adamw(1e-3, weight_decay=1e-2, mask=lambda p: {"w": True, "b": False})
    >>> state = tx.init({"w": jnp.ones(2), "b": jnp.zeros(2)})

  References:
    Loshchilov & Hutter, `Decoupled Weight Decay Regularization
    <https://arxiv.org/abs/1711.05101>`_, 2019; `optax.adamw`.
  """
  _common.check_hyperparameter("learning_rate", learning_rate, allow_schedule=True)
  _common.check_hyperparameter("weight_decay", weight_decay, allow_schedule=True)
  return optax.chain(
    scale_by_adam(b1, b2, eps, eps_root, mu_dtype, nesterov=nesterov),
    optax.add_decayed_weights(weight_decay, mask),
    optax.scale_by_learning_rate(learning_rate),
  )
