"""optax's own published tests, run against adamjax's optax-semantics presets.

The sdist of the pinned optax is fetched from the package index at test time (cached in pytest's
cache directory, never committed), extracted to a scratch directory, and its Adam tests run
twice in subprocesses: once as published, once with `optax.adam`, `optax.adamw`,
`optax.nadam`, `optax.nadamw` and `optax.scale_by_adam` replaced by adamjax's (see
`optax_conformance_conftest.py`). Any test that passes with optax and not with adamjax fails
this test, unless it is one of the documented, deliberate differences below; a documented
difference that no longer differs fails it too, so the list stays true.
"""

import hashlib
import importlib.metadata
import json
import os
import pathlib
import platform
import shutil
import subprocess
import sys
import tarfile
import xml.etree.ElementTree as ET

import pytest

OPTAX_VERSION = importlib.metadata.version("optax")

# optax's tests of Adam, AdamW and what wraps or injects them. alias_test.py and
# contrib/_common_test.py are cut to their Adam/AdamW (and nesterov) cases by the conftest.
TEST_FILES = [
  "optax/_src/alias_test.py",
  "optax/_src/combine_test.py",
  "optax/_src/float64_test.py",
  "optax/_src/transform_test.py",
  "optax/_src/update_test.py",
  "optax/contrib/_common_test.py",
  "optax/contrib/_complex_valued_test.py",
  "optax/contrib/_galore_test.py",
  "optax/contrib/_schedule_free_test.py",
  "optax/schedules/_inject_test.py",
  "optax/transforms/_accumulation_test.py",
  "optax/transforms/_combining_test.py",
  "optax/tree_utils/_state_utils_test.py",
]

# Test id -> why adamjax deliberately differs. Each is a refusal where optax computes garbage.
DOCUMENTED_DIFFERENCES = {
  "optax.transforms._combining_test.ExtraArgsTest.test_extra_args": (
    "integer parameters {'a': 1, 'b': 2}: optax casts the second moment back to int32 (0), "
    "divides by eps and truncates the parameters; adamjax raises TypeError"
  ),
  "optax._src.combine_test.ExtraArgsTest.test_extra_args": (
    "the same test under its old module name: integer parameters, refused with TypeError"
  ),
}


def _sdist(cache: pathlib.Path) -> pathlib.Path:
  """The extracted optax sdist, downloaded once into `cache` with pip."""
  root = cache / f"optax-{OPTAX_VERSION}"
  if (root / "optax" / "_src" / "alias_test.py").exists():
    return root
  archive = cache / f"optax-{OPTAX_VERSION}.tar.gz"
  if not archive.exists():
    download = [sys.executable, "-m", "pip", "download", f"optax=={OPTAX_VERSION}"]
    download += ["--no-binary", ":all:", "--no-deps", "--quiet", "-d", str(cache)]
    result = subprocess.run(download, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and archive.exists(), result.stdout + result.stderr
  with tarfile.open(archive) as tar:
    tar.extractall(cache, filter="data")
  return root


def _outcomes(junit: pathlib.Path) -> dict[str, str]:
  """`{module.Class.test: passed|failed|skipped}` from a JUnit XML report."""
  out = {}
  for case in ET.parse(junit).iter("testcase"):
    kinds = {child.tag for child in case}
    outcome = "failed" if kinds & {"failure", "error"} else "passed"
    if "skipped" in kinds:
      outcome = "skipped"
    out[f"{case.get('classname')}.{case.get('name')}"] = outcome
  return out


def _optax_arm_key() -> str:
  """The optax arm's outcomes depend only on these versions (and the test selection)."""
  packages = ("optax", "jax", "jaxlib", "numpy", "absl-py", "pytest")
  versions = {p: importlib.metadata.version(p) for p in packages}
  versions |= {"python": platform.python_version(), "files": TEST_FILES}
  conftest = pathlib.Path(__file__).with_name("optax_conformance_conftest.py").read_bytes()
  digest = hashlib.sha256(json.dumps(versions, sort_keys=True).encode() + conftest).hexdigest()
  return f"adamjax/optax-conformance-{digest[:16]}"


def _run_arm(arm: str, scratch: pathlib.Path, report: pathlib.Path) -> subprocess.Popen:
  env = dict(os.environ, ADAMJAX_CONFORMANCE_ARM=arm, JAX_PLATFORMS="cpu")
  env["PYTHONPATH"] = str(pathlib.Path(__file__).resolve().parents[1])
  command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist"]
  command += ["-p", "no:randomly", f"--junitxml={report}", "-o", "junit_family=xunit1"]
  return subprocess.Popen(
    command + TEST_FILES,
    cwd=scratch,
    env=env,
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
  )


@pytest.mark.slow
def test_optax_published_tests_pass_with_adamjax(request, tmp_path):
  # pytest's cache keeps the sdist and optax's outcomes between runs; without it (run with
  # `-p no:cacheprovider`) both are made afresh in the test's own directory.
  store = getattr(request.config, "cache", None)
  cache = store.mkdir("optax-sdist") if store else tmp_path / "sdist"
  cache.mkdir(exist_ok=True)
  scratch = tmp_path / "optax"
  shutil.copytree(_sdist(cache), scratch)
  shutil.copy(
    pathlib.Path(__file__).with_name("optax_conformance_conftest.py"), scratch / "conftest.py"
  )
  # optax's own outcomes are cached per environment (pytest's cache): later runs only run the
  # adamjax arm, about two minutes on one core.
  key = _optax_arm_key()
  optax_out = store.get(key, None) if store else None
  arms = ("adamjax",) if optax_out else ("optax", "adamjax")
  runs = {arm: _run_arm(arm, scratch, tmp_path / f"{arm}.xml") for arm in arms}
  logs = {arm: run.communicate(timeout=900)[0] for arm, run in runs.items()}
  for arm, log in logs.items():
    # The conftest says which Adam each arm ran; pytest exits 0 or 1 (some test failed).
    assert f"ADAMJAX_CONFORMANCE arm={arm} optax.adam={arm}." in log, log[-3000:]
    assert runs[arm].returncode in (0, 1), log[-3000:]
  if optax_out is None:
    optax_out = _outcomes(tmp_path / "optax.xml")
    if store:
      store.set(key, optax_out)
  adamjax_out = _outcomes(tmp_path / "adamjax.xml")
  passed = {
    arm: sum(v == "passed" for v in out.values())
    for arm, out in (("optax", optax_out), ("adamjax", adamjax_out))
  }
  print(
    f"optax {OPTAX_VERSION}'s tests: passed with adamjax {passed['adamjax']}, "
    f"with optax {passed['optax']}, of {len(optax_out)}"
  )
  assert len(optax_out) > 250 and set(adamjax_out) == set(optax_out)
  differ = {
    test: adamjax_out[test]
    for test, outcome in optax_out.items()
    if outcome == "passed" and adamjax_out[test] != "passed"
  }
  undocumented = {t: o for t, o in differ.items() if t not in DOCUMENTED_DIFFERENCES}
  assert not undocumented, f"pass with optax {OPTAX_VERSION} but not with adamjax: {undocumented}"
  stale = set(DOCUMENTED_DIFFERENCES) - set(differ)
  assert not stale, f"documented differences that no longer differ: {sorted(stale)}"
