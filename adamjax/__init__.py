"""adamjax: Adam for JAX as optax gradient transformations, exact to each framework's float32.

Presets, each an `optax.GradientTransformation` with its framework's constructor:

- :func:`adam`, :func:`adamw`: optax semantics (Algorithm 1), drop-ins for `optax.adam`/`adamw`.
- :func:`keras_adam`, :func:`keras_adamw`: `keras.optimizers.Adam`/`AdamW` with every option.
- :func:`tf1_adam`: `tf.compat.v1.train.AdamOptimizer` (TF's `ApplyAdam` kernel).
- :func:`torch_adam`, :func:`torch_adamw`: `torch.optim.Adam`/`AdamW` (single-tensor path).

Keras's optimizer features as composable pieces: :func:`keras_clip_by_norm`,
:func:`keras_clip_by_global_norm`, :func:`keras_clip_by_value`, :func:`keras_weight_decay`,
:func:`ema` (read with :func:`ema_params`), :func:`keras_gradient_accumulation`,
:func:`unscale_gradients`, :func:`dynamic_loss_scale` (with :func:`scale_loss`), and the
`scale_by_*` steps for your own chains. `import adamjax` never imports TensorFlow or Keras.
"""

from adamjax._accumulation import KerasAccumulationState, keras_gradient_accumulation
from adamjax._ema import EmaState, ema, ema_params
from adamjax._flat import FlatLayout
from adamjax._keras_adam import (
  ScaleByKerasAdamState,
  keras_adam,
  keras_adamw,
  scale_by_keras_adam,
)
from adamjax._keras_clip import (
  KerasClipState,
  keras_clip_by_global_norm,
  keras_clip_by_norm,
  keras_clip_by_value,
)
from adamjax._keras_weight_decay import KerasWeightDecayState, keras_weight_decay
from adamjax._loss_scale import (
  DynamicLossScaleState,
  dynamic_loss_scale,
  scale_loss,
  unscale_gradients,
)
from adamjax._optax_adam import ScaleByAdamState, adam, adamw, scale_by_adam
from adamjax._sharding import state_sharding
from adamjax._tf1_adam import ScaleByTF1AdamState, scale_by_tf1_adam, tf1_adam
from adamjax._torch_adam import ScaleByTorchAdamState, scale_by_torch_adam, torch_adam, torch_adamw

__version__ = "0.1.0"

__all__ = [
  "DynamicLossScaleState",
  "EmaState",
  "FlatLayout",
  "KerasAccumulationState",
  "KerasClipState",
  "KerasWeightDecayState",
  "ScaleByAdamState",
  "ScaleByKerasAdamState",
  "ScaleByTF1AdamState",
  "ScaleByTorchAdamState",
  "adam",
  "adamw",
  "dynamic_loss_scale",
  "ema",
  "ema_params",
  "keras_adam",
  "keras_adamw",
  "keras_clip_by_global_norm",
  "keras_clip_by_norm",
  "keras_clip_by_value",
  "keras_gradient_accumulation",
  "keras_weight_decay",
  "scale_by_adam",
  "scale_by_keras_adam",
  "scale_by_tf1_adam",
  "scale_by_torch_adam",
  "scale_loss",
  "state_sharding",
  "tf1_adam",
  "torch_adam",
  "torch_adamw",
  "unscale_gradients",
]
