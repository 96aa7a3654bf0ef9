"""What the tests, the benchmarks and ``train/parity.py`` share, in one copy.

``import adamjax`` does not load this package; import it as ``adamjax.testing``. At import it
loads only NumPy, JAX and optax: Keras and TensorFlow are imported inside the functions that use
them, so the caller chooses the Keras backend (``KERAS_BACKEND``) before they run.

- Comparing floats: :func:`ulp_distance` (elementwise), :func:`max_ulps` and
  :func:`max_abs_diff` (the worst over two trees of arrays).
- Keras on another backend: :func:`call_in_keras_backend` runs a function from a ``.py`` file in
  a fresh process with ``KERAS_BACKEND`` set, arrays in and out as ``.npz`` (no pickles);
  :func:`run_in_keras_backend` runs any command that way.
- The Keras tutorial's model: :func:`tutorial_mlp` (``Sequential([Flatten, Dense(128, relu),
  Dropout(0.2), Dense(10)])``, layers named ``flatten``, ``dense``, ``dropout``, ``dense_1``).
- Reference Adam trajectories on a fixed gradient sequence: :func:`make_params`,
  :func:`make_gradient_sequence`; :func:`run_keras_jax`, :func:`run_keras_tf`,
  :func:`run_tf1_adam` (the real libraries) and :func:`run_optax` (any optax transformation),
  with the ``keras.optimizers.Adam`` option configurations in :data:`KERAS_ADAM_OPTIONS`.

Example::

  import adamjax
  from adamjax import testing

  params = testing.make_params({"w": (3,)}, seed=0)
  grads = testing.make_gradient_sequence({"w": (3,)}, steps=10, seed=0)
  ours = testing.run_optax(adamjax.keras_adam(), params, grads)
  keras = testing.run_keras_tf(params, grads, config={})
  assert testing.max_ulps(ours["params"], keras.params) <= 2
"""

from adamjax.testing._keras_options import (
  KERAS_ADAM_OPTIONS,
  KERAS_OPTIONS_ACCUMULATING,
  KERAS_OPTIONS_NOT_POW2,
  keras_adam_for_option,
  keras_option_config,
  keras_option_schedule,
)
from adamjax.testing._keras_subprocess import (
  KerasSubprocessError,
  call_in_keras_backend,
  run_in_keras_backend,
)
from adamjax.testing._models import TUTORIAL_LAYER_NAMES, tutorial_mlp
from adamjax.testing._optax_runner import run_optax
from adamjax.testing._trajectories import (
  Trajectory,
  keras_slot_indices,
  make_gradient_sequence,
  make_keras_optimizer,
  make_params,
  run_keras_jax,
  run_keras_tf,
  run_tf1_adam,
)
from adamjax.testing._ulp import max_abs_diff, max_ulps, ulp_distance

__all__ = [
  "KERAS_ADAM_OPTIONS",
  "KERAS_OPTIONS_ACCUMULATING",
  "KERAS_OPTIONS_NOT_POW2",
  "TUTORIAL_LAYER_NAMES",
  "KerasSubprocessError",
  "Trajectory",
  "call_in_keras_backend",
  "keras_adam_for_option",
  "keras_option_config",
  "keras_option_schedule",
  "keras_slot_indices",
  "make_gradient_sequence",
  "make_keras_optimizer",
  "make_params",
  "max_abs_diff",
  "max_ulps",
  "run_in_keras_backend",
  "run_keras_jax",
  "run_keras_tf",
  "run_optax",
  "run_tf1_adam",
  "tutorial_mlp",
  "ulp_distance",
]
