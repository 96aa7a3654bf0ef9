"""Builds and trains a tf-keras (Keras 2) model with recurrent, attention and masked layers and
saves it as a legacy ``.h5`` full model (run by ``call_in_keras_backend`` with
``TF_USE_LEGACY_KERAS=1``)."""

import os


def build_tf_keras_h5(arrays, spec):
  import tf_keras as keras

  layers = keras.layers
  keras.utils.set_random_seed(0)
  ids = keras.Input((6,), dtype="int32")
  h = layers.Embedding(9, 4, mask_zero=True)(ids)
  h = layers.Bidirectional(layers.LSTM(3, return_sequences=True))(h)
  h = layers.GRU(3)(h)
  seq = keras.Input((5, 4))
  m = layers.MultiHeadAttention(2, 3)(seq, seq)
  m = layers.DepthwiseConv1D(3)(m)
  m = layers.GlobalAveragePooling1D()(m)
  y = layers.Dense(2)(layers.Concatenate()([h, m]))
  model = keras.Model([ids, seq], y)
  model.compile(optimizer="adam", loss="mse")
  inputs = [arrays["ids"], arrays["seq"]]
  model.fit(inputs, arrays["y"], batch_size=2, epochs=1, verbose=0)
  model.save(os.path.join(spec["out"], "model.h5"))
  return {"logits": model.predict(inputs, verbose=0)}
