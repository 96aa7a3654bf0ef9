"""Test-wide settings: strict JAX, Keras on the JAX backend, quiet TensorFlow."""

import os

# Keras picks its backend once, at import. The in-process Keras is the JAX backend; the
# TensorFlow-backend reference runs in a subprocess (adamjax.testing.run_keras_tf).
os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402

# Strict JAX: implicit rank promotion is an error in everything the tests run.
jax.config.update("jax_numpy_rank_promotion", "raise")
