"""conftest.py for optax's own tests, run by tests/test_optax_conformance.py in a scratch copy.

Copied to the root of the extracted optax sdist. With `ADAMJAX_CONFORMANCE_ARM=adamjax` it
replaces optax's Adam entry points by adamjax's optax-semantics presets before any optax test
module is imported; with `optax` it changes nothing. Both arms get the same selection and the
same scikit-learn stub, so the only difference between them is the optimizer.
"""

import functools
import os
import re
import sys
import types

# optax's alias_test.py imports scikit-learn for one L-BFGS test (not selected below); the test
# environment does not install it, so a stub module lets the file import. Any use would fail.
for _name in ("sklearn", "sklearn.datasets", "sklearn.linear_model"):
  sys.modules.setdefault(_name, types.ModuleType(_name))
sys.modules["sklearn"].datasets = sys.modules["sklearn.datasets"]
sys.modules["sklearn"].linear_model = sys.modules["sklearn.linear_model"]

ARM = os.environ["ADAMJAX_CONFORMANCE_ARM"]

if ARM == "adamjax":
  import optax
  from optax._src import alias, transform

  import adamjax

  # Module attributes, so both `optax.adam` and optax's internal `alias.adam` /
  # `transform.scale_by_adam` (used by adamw, lamb, the contrib wrappers) resolve to adamjax.
  # nadam/nadamw are `functools.partial(adam, nesterov=True)` in optax: rebuilt the same way.
  _PATCHES = {
    "adam": adamjax.adam,
    "adamw": adamjax.adamw,
    "nadam": functools.partial(adamjax.adam, nesterov=True),
    "nadamw": functools.partial(adamjax.adamw, nesterov=True),
  }
  for _name, _fn in _PATCHES.items():
    setattr(alias, _name, _fn)
    setattr(optax, _name, _fn)
  transform.scale_by_adam = optax.scale_by_adam = adamjax.scale_by_adam
elif ARM != "optax":
  raise ValueError(f"ADAMJAX_CONFORMANCE_ARM must be 'optax' or 'adamjax', got {ARM!r}")

# In these files only the tests of Adam and AdamW (with and without nesterov) are kept: the
# others exercise optax's other optimizers, which adamjax does not replace.
_ADAM_ONLY = ("alias_test.py", "contrib/_common_test.py")
_ADAM_PARAM = re.compile(r"opt_name'?(=|: )'n?adamw?'")


def pytest_collection_modifyitems(config, items):
  kept, dropped = [], []
  for item in items:
    path = item.path.as_posix()
    if any(path.endswith(suffix) for suffix in _ADAM_ONLY):
      params = getattr(getattr(item, "obj", None), "__x_params_repr__", "")
      if not _ADAM_PARAM.search(params):
        dropped.append(item)
        continue
    kept.append(item)
  if dropped:
    config.hook.pytest_deselected(items=dropped)
    items[:] = kept


def pytest_terminal_summary(terminalreporter):
  # Says in the output which optimizer ran; the parent test checks it.
  import optax

  terminalreporter.write_line(
    f"ADAMJAX_CONFORMANCE arm={ARM} optax.adam={optax.adam.__module__}.{optax.adam.__name__}"
  )
