"""adamjax: Adam for JAX as optax gradient transformations, exact to each framework's float32.

Presets, each an `optax.GradientTransformation` with its framework's constructor:

- :func:`adam`: optax semantics (Algorithm 1), a drop-in for `optax.adam`.
- :func:`keras_adam`: `keras.optimizers.Adam` (epsilon hat, eps 1e-7, Keras's rounding).
- :func:`tf1_adam`: `tf.compat.v1.train.AdamOptimizer` (TF's `ApplyAdam` kernel).

and the `scale_by_*` pieces for composing your own chains. `import adamjax` never imports
TensorFlow or Keras.
"""

from adamjax._keras_adam import ScaleByKerasAdamState, keras_adam, scale_by_keras_adam
from adamjax._optax_adam import ScaleByAdamState, adam, scale_by_adam
from adamjax._tf1_adam import ScaleByTF1AdamState, scale_by_tf1_adam, tf1_adam

__version__ = "0.1.0"

__all__ = [
    "ScaleByAdamState",
    "ScaleByKerasAdamState",
    "ScaleByTF1AdamState",
    "adam",
    "keras_adam",
    "scale_by_adam",
    "scale_by_keras_adam",
    "scale_by_tf1_adam",
    "tf1_adam",
]
