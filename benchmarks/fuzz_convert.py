"""Mutation-fuzz the checkpoint converter: any number of mutants, any seed; a table per format.

Every mutant of a real Keras/TF checkpoint must be accepted or refused with a short
``ConversionError``, within the time limit and a 4 GiB address-space limit (see
``tests/convert_fuzz.py`` for the mutations and the fork server).

  python benchmarks/fuzz_convert.py --seed 7 --mutants 10000 [--timeout 60] [--show-other 20]

The seed checkpoints are built once with Keras 3, tf-keras and TensorFlow (a few minutes) into
``--fixtures`` (default ``$TMPDIR/adamjax_fuzz_seeds``) and reused.
"""

import argparse
import collections
import json
import pathlib
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests"))

import convert_fuzz  # noqa: E402
from tf_fixtures_build import run_tf_backend_script  # noqa: E402

TESTS = pathlib.Path(__file__).resolve().parents[1] / "tests"


def build_seeds(base: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
  keras_dir, tf_dir = base / "keras_fixtures", base / "tf_fixtures"
  if not (keras_dir / "manifest.json").is_file():
    run_tf_backend_script(TESTS / "fixtures_keras.py", "build", str(keras_dir))
  if not (tf_dir / "manifest.json").is_file():
    run_tf_backend_script(TESTS / "fixtures_tf.py", str(tf_dir))
  return keras_dir, tf_dir


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--seed", type=int, default=1)
  parser.add_argument("--mutants", type=int, default=1000)
  parser.add_argument("--timeout", type=float, default=60.0, help="seconds per mutant")
  parser.add_argument(
    "--fixtures",
    type=pathlib.Path,
    default=pathlib.Path(tempfile.gettempdir()) / "adamjax_fuzz_seeds",
  )
  parser.add_argument("--formats", nargs="*", help="only these formats")
  parser.add_argument("--show-other", type=int, default=30, help="list this many non-refusals")
  parser.add_argument("--log", type=pathlib.Path, help="write every outcome as JSON lines here")
  parser.add_argument("--jobs", type=int, default=1, help="fork servers running side by side")
  parser.add_argument("--shard", default="0/1", help=argparse.SUPPRESS)
  parser.add_argument(
    "--indices", type=lambda s: {int(i) for i in s.split(",")}, help="rerun only these mutants"
  )
  args = parser.parse_args()
  if args.jobs > 1:
    return run_jobs(args)
  seeds = convert_fuzz.seeds(*build_seeds(args.fixtures))
  if args.formats:
    seeds = {k: v for k, v in seeds.items() if k in args.formats}
  start = time.monotonic()
  outcomes = []
  log = open(args.log, "w") if args.log else None  # noqa: SIM115
  with tempfile.TemporaryDirectory(prefix="adamjax_fuzz_") as work:
    shard, shards = map(int, args.shard.split("/"))
    for o in convert_fuzz.fuzz(
      seeds,
      args.mutants,
      args.seed,
      pathlib.Path(work),
      timeout=args.timeout,
      shard=(shard, shards),
      indices=args.indices,
    ):
      outcomes.append(o)
      if log:
        log.write(json.dumps(o.__dict__) + "\n")
        log.flush()
      if o.outcome not in ("accepted", "refused"):
        print(
          f"[{o.index}] {o.fmt} {o.outcome}: {o.mutation} -> {o.detail}",
          file=sys.stderr,
          flush=True,
        )
  if log:
    log.close()
  if args.shard != "0/1":
    return None
  report(args, outcomes, time.monotonic() - start)


def report(args, outcomes, elapsed) -> None:
  print(
    f"python benchmarks/fuzz_convert.py --seed {args.seed} --mutants {args.mutants} "
    f"--timeout {args.timeout:g} --jobs {args.jobs}: {elapsed:.0f} s, address-space limit "
    f"{convert_fuzz.ADDRESS_SPACE_LIMIT >> 30} GiB per mutant\n"
  )
  print(convert_fuzz.table(outcomes))
  bad = [o for o in outcomes if o.outcome not in ("accepted", "refused")]
  kinds = collections.Counter(o.detail.split(" at ")[0][:120] for o in bad)
  for detail, n in kinds.most_common(args.show_other):
    print(f"{n:5d}  {detail}")
  sys.exit(1 if bad else 0)


def run_jobs(args) -> None:
  """Runs ``--jobs`` copies of this script on interleaved mutants, then one table."""
  import subprocess

  start = time.monotonic()
  base = args.log or pathlib.Path(tempfile.mkdtemp()) / "fuzz.jsonl"
  procs = []
  for k in range(args.jobs):
    cmd = [sys.executable, __file__, "--seed", str(args.seed), "--mutants", str(args.mutants)]
    cmd += ["--timeout", str(args.timeout), "--fixtures", str(args.fixtures)]
    cmd += ["--shard", f"{k}/{args.jobs}", "--log", f"{base}.{k}"]
    if args.formats:
      cmd += ["--formats", *args.formats]
    procs.append(subprocess.Popen(cmd))
  for p in procs:
    p.wait()
  outcomes = []
  for k in range(args.jobs):
    with open(f"{base}.{k}") as f:
      outcomes += [convert_fuzz.Outcome(**json.loads(line)) for line in f]
  report(args, sorted(outcomes, key=lambda o: o.index), time.monotonic() - start)


if __name__ == "__main__":
  main()
