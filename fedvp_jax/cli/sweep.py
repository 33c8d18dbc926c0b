"""fedvp sweep: run a grid of configurations into one folder, then write their table and
plots.

Examples:
  fedvp sweep weekly-table --out sweeps/weekly --data-dir ../shared/data
  fedvp sweep weekly-table --out sweeps/quick --rounds 20 --num-seeds 1 --model lstm \\
      --data-dir ../shared/data
  fedvp sweep weekly-table --print-spec > my_grid.toml
  fedvp sweep my_grid.toml --out sweeps/mine --checkpoint-every 10

SPEC is a preset (weekly-table: the researcher's comparison table, on the real David traces)
or a TOML spec file; --print-spec prints a preset as an example of the format. A training
flag given here (--dataset, --rounds, --num-seeds, --model, ...) overrides that setting in
every run; --rounds counts the rounds after FedGen's pretraining, so a run with
pretrain_rounds = 50 and --rounds 20 has 70 (the table's "rounds" column shows the total).
Runs already finished in --out are reused; interrupted ones resume from their checkpoints. The
table (results.md, results.csv) and plots go into --out; fedvp report redraws them.
Configurations that differ only in settings held as values (beta, what is sent, learning
rates, FedGen's weights, pretraining and warm-up lengths) compile and run as one program, each
still written to its own folder (the weekly table is two programs); --no-grouping runs each
alone, and --group-memory caps one program's memory.
"""

from __future__ import annotations

import argparse
import math
import sys

from fedvp_jax.cli.common import add_run_options, command, command_parser, join_job, on_device
from fedvp_jax.cli.flags import add_settings, config_from, given_settings


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
  p = command_parser(__doc__, prog)
  p.add_argument("spec", help="a preset (weekly-table) or a TOML spec file")
  p.add_argument("--out", help="the sweep folder (default: sweeps/<spec name>)")
  p.add_argument("--print-spec", action="store_true", help="print the spec's text and stop")
  p.add_argument("--dry-run", action="store_true", help="list the runs and stop")
  p.add_argument(
    "--overwrite",
    action="store_true",
    help="rerun configurations whose folder holds a run with other settings",
  )
  p.add_argument(
    "--no-grouping",
    action="store_true",
    help="compile and run every configuration on its own (by default, configurations that "
    "differ only in settings held as values, such as beta, the send mode, learning rates and "
    "pretraining length, run together as one program)",
  )
  p.add_argument(
    "--group-memory",
    type=_gibibytes,
    metavar="GIB",
    help="the most memory one group's program may take, in GiB; larger groups are split "
    "(default: 80%% of the device's memory, or of the host's on the CPU)",
  )
  add_run_options(p)
  add_settings(p)  # given ones override the spec's value in every run
  return p


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
  parser = build_parser(prog)
  args = parser.parse_args(argv)
  overrides = given_settings(args)
  config_from(parser, overrides)  # a bad value is an error against its flag, before the spec

  def body() -> int:
    from fedvp_jax.config import SCHEMA
    from fedvp_jax.sweep import expand_spec, read_spec

    text, label = read_spec(args.spec)
    if args.print_spec:
      print(text, end="")
      return 0
    typed = {name: SCHEMA[name].coerce(value, from_text=True) for name, value in overrides.items()}
    runs = expand_spec(text, label, typed)
    if args.dry_run:
      for r in runs:
        c = r.config
        print(
          f"{r.name:32s} {c.algorithm:15s} beta {c.round.beta:<4} {c.total_rounds} rounds "
          f"x{c.num_seeds}"
        )
      if not args.no_grouping:
        from fedvp_jax.sweep import run_groups

        for k, group in enumerate(run_groups(runs), start=1):
          print(f"program {k}: {len(group)} run(s): {', '.join(r.name for r in group)}")
      return 0
    out = args.out or f"sweeps/{args.spec.removesuffix('.toml').rsplit('/', 1)[-1]}"
    return _run(runs, out, args)

  return command(body)


def _gibibytes(text: str) -> int:
  """A positive size in GiB, as bytes."""
  try:
    value = float(text)
  except ValueError:
    value = 0.0
  if not (value > 0 and math.isfinite(value)):
    raise argparse.ArgumentTypeError(f"{text!r}: give a positive number of GiB, e.g. 8")
  return int(value * 2**30)


def _run(runs, out: str, args: argparse.Namespace) -> int:
  from fedvp_jax.cli.progress import follow
  from fedvp_jax.report import write_report
  from fedvp_jax.rundir import is_process_zero
  from fedvp_jax.sweep import sweep_steps

  join_job(args)
  with on_device(args.device):
    steps = sweep_steps(
      runs,
      out,
      overwrite=args.overwrite,
      grouping=not args.no_grouping,
      memory_limit=args.group_memory,
      checkpoint_every=args.checkpoint_every,
      tensorboard=args.tensorboard,
    )
    outcomes = follow(steps, args.progress)
  if is_process_zero():
    write_report(out)
  failed = [
    name for name, outcome in outcomes.items() if outcome.startswith(("diverged", "failed"))
  ]
  if failed:
    print(f"diverged or failed: {', '.join(failed)}", file=sys.stderr)
    return 1
  return 0


__all__ = ["build_parser", "main"]

if __name__ == "__main__":
  sys.exit(main())
