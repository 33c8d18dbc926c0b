#!/usr/bin/env python3
"""Run a grid of configurations into one folder, then write their table and plots.

Examples:
  python scripts/sweep.py weekly-table --out sweeps/weekly --data-dir ../shared/data
  python scripts/sweep.py weekly-table --out sweeps/quick --rounds 20 --times 1 --model lstm
  python scripts/sweep.py my_grid.toml --out sweeps/lr --checkpoint-every 10
  python scripts/sweep.py weekly-table --print-spec > my_grid.toml

SPEC is a preset (weekly-table: the researcher's comparison table) or a TOML spec file; the
format is documented in fedvp_jax/sweep.py and --print-spec prints the preset as an example.
Any training flag given here (--dataset, --rounds, --times, --model, --num_users, ...)
overrides that setting in every run. Runs already finished in --out are not recomputed;
interrupted ones resume from their checkpoints. Repeats (--times) of a configuration run
together as one vmapped program. The table (results.md, results.csv) and plots (loss.png,
loss_<group>.png, orthodromic.png) go into --out; scripts/report.py redraws them.
"""

from __future__ import annotations

import argparse
import sys

import jax

from fedvp_jax.cli import add_config_arguments, at_least, config_overrides
from fedvp_jax.errors import FedVPError
from fedvp_jax.report import write_report
from fedvp_jax.sweep import PRESETS, expand_spec, read_spec, run_sweep
from fedvp_jax.training import resolve_device


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
    description=__doc__.split("\n\n")[0],
    formatter_class=argparse.RawDescriptionHelpFormatter,
    epilog="\n\n".join(__doc__.split("\n\n")[1:]),
  )
  p.add_argument("spec", help=f"a preset ({', '.join(PRESETS)}) or a TOML spec file")
  p.add_argument("--out", help="the sweep folder (default: sweeps/<spec name>)")
  p.add_argument("--print-spec", action="store_true", help="print the spec's text and stop")
  p.add_argument("--dry-run", action="store_true", help="list the runs and stop")
  p.add_argument(
    "--overwrite",
    action="store_true",
    help="rerun configurations whose folder holds a run with other settings",
  )
  p.add_argument(
    "--checkpoint-every",
    "--checkpoint_every",
    dest="checkpoint_every",
    type=at_least(1),
    help="checkpoint every run every K rounds, so a killed sweep resumes where it stopped",
  )
  p.add_argument(
    "--device", default="cpu", help="cpu, or cuda/gpu (CPU with a warning when there is no GPU)"
  )
  p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress line")
  add_config_arguments(p)  # given ones override the spec's value in every run
  return p


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  parser = build_parser()
  args = parser.parse_args(argv)
  try:
    text, label = read_spec(args.spec)
    if args.print_spec:
      print(text, end="")
      return 0
    runs = expand_spec(text, label, config_overrides(argv))
    if args.dry_run:
      for r in runs:
        c = r.config
        print(f"{r.name:32s} {c.algo:15s} beta {c.beta:<4} {c.total_rounds} rounds x{c.times}")
      return 0
    out = args.out or f"sweeps/{args.spec.removesuffix('.toml').rsplit('/', 1)[-1]}"
    with jax.default_device(resolve_device(args.device)):
      outcomes = run_sweep(
        runs,
        out,
        overwrite=args.overwrite,
        checkpoint_every=args.checkpoint_every,
        progress=args.progress,
      )
    write_report(out)
  except FedVPError as err:
    print(f"error: {err}", file=sys.stderr)
    return 2
  failed = [name for name, outcome in outcomes.items() if outcome.startswith("diverged")]
  if failed:
    print(f"diverged: {', '.join(failed)}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
