"""The examples in adamjax's docstrings run and print what they say."""

import doctest
import importlib

import pytest

MODULES = [
  "adamjax._optax_adam",
  "adamjax._keras_adam",
  "adamjax._tf1_adam",
  "adamjax._ema",
  "adamjax._keras_weight_decay",
  "adamjax._loss_scale",
  "adamjax._torch_adam",
  "adamjax.testing._ulp",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
  module = importlib.import_module(name)
  result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
  assert result.attempted > 0, f"{name} has no examples"
  assert result.failed == 0
