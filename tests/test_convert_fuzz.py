"""Mutants of real Keras/TF checkpoints are accepted or refused with a short ConversionError.

A fixed-seed subset of the mutation fuzzer (``convert_fuzz.py``; the full run is
``benchmarks/fuzz_convert.py``): every format the converter reads, byte-level and
structure-aware mutations, each mutant checked in a forked child under a 4 GiB address-space
limit and a wall-clock limit. Any other exception, a crash, a time-out or running out of memory
fails the test with the mutation that caused it. The fork server is a fresh process (see
``convert_fuzz.main``).
"""

import collections
import json
import subprocess
import sys
from pathlib import Path

import convert_fuzz
import pytest
from tf_fixtures_build import build_once

HERE = Path(__file__).parent
SUITE_SEED = 20261204  # The benchmark's 10,000-mutant runs use other seeds.
SUITE_MUTANTS = 280  # 40 per format; one to two minutes on one core.


@pytest.fixture(scope="session")
def seed_dirs(tmp_path_factory):
  keras_dir = build_once(tmp_path_factory, "keras_fixtures", HERE / "fixtures_keras.py", "build")
  tf_dir = build_once(tmp_path_factory, "tf_fixtures", HERE / "fixtures_tf.py")
  return keras_dir, tf_dir


def _fuzz(seed_dirs, *args: str) -> list[convert_fuzz.Outcome]:
  proc = subprocess.run(
    [sys.executable, str(HERE / "convert_fuzz.py"), *map(str, seed_dirs), *args],
    capture_output=True,
    text=True,
    timeout=1200,
    check=False,
    cwd=HERE.parent,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  return [convert_fuzz.Outcome(**json.loads(line)) for line in proc.stdout.splitlines()]


def test_every_format_has_seeds_that_convert(seed_dirs):
  outcomes = _fuzz(seed_dirs, "--mutants", "0", "--timeout", "120")
  by_fmt = collections.defaultdict(list)
  for o in outcomes:
    by_fmt[o.fmt].append(o.outcome)
  assert set(by_fmt) == {
    "keras",
    "weights.h5",
    "weights.json",
    "tf-keras-h5",
    "tf-checkpoint",
    "savedmodel",
    "orbax-callback",
  }
  # Unmutated seeds are accepted or refused for a stated reason (a schedule, no optimizer in
  # an export); at least one per format goes all the way (read, to-jax checks, write), so
  # mutants explore the whole path, not only the first check.
  for fmt, results in by_fmt.items():
    assert set(results) <= {"accepted", "refused"}, (fmt, results)
    assert "accepted" in results, fmt


def test_mutants_are_accepted_or_refused(seed_dirs):
  outcomes = _fuzz(
    seed_dirs, "--seed", str(SUITE_SEED), "--mutants", str(SUITE_MUTANTS), "--timeout", "60"
  )
  assert len(outcomes) == SUITE_MUTANTS
  counts = collections.Counter(o.outcome for o in outcomes)
  bad = [o for o in outcomes if o.outcome not in ("accepted", "refused")]
  assert not bad, "\n".join(f"{o.fmt} {o.mutation}: {o.outcome} {o.detail}" for o in bad[:20])
  # The mutations reach both outcomes (a fuzzer whose mutants all fail the first check, or
  # all pass unnoticed, tests little).
  assert counts["refused"] > SUITE_MUTANTS // 4 and counts["accepted"] > SUITE_MUTANTS // 10
