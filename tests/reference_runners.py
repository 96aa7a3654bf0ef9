"""The reference runners under the name the parity tests import; the code is `adamjax.testing`.

Drives the real Keras 3 (JAX and TensorFlow backends) and TensorFlow v1 Adam on a fixed gradient
sequence and records every step (`adamjax/testing/_trajectories.py`), plus the ulp metrics. New
code imports `adamjax.testing` directly.
"""

from adamjax.testing import (
  Trajectory,
  keras_slot_indices,
  make_gradient_sequence,
  make_keras_optimizer,
  make_params,
  max_abs_diff,
  max_ulps,
  run_keras_jax,
  run_keras_tf,
  run_tf1_adam,
  ulp_distance,
)

__all__ = [
  "Trajectory",
  "keras_slot_indices",
  "make_gradient_sequence",
  "make_keras_optimizer",
  "make_params",
  "max_abs_diff",
  "max_ulps",
  "run_keras_jax",
  "run_keras_tf",
  "run_tf1_adam",
  "ulp_distance",
]
