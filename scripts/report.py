#!/usr/bin/env python3
"""Redraw the results table and plots of finished runs from their saved metrics alone.

Examples:
  python scripts/report.py sweeps/weekly
  python scripts/report.py runs/fedavg_A runs/fedgen_B --out reports/ab

Each RUN_DIR is a run directory (scripts/train.py's) or a folder of them (a sweep folder keeps
its order and groups). Writes results.md, results.csv, loss.png, loss_<group>.png and
orthodromic.png into --out (default: the one folder given).
"""

from __future__ import annotations

import argparse
import sys

from fedvp_jax.errors import FedVPError
from fedvp_jax.report import write_report


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
    description=__doc__.split("\n\n")[0],
    formatter_class=argparse.RawDescriptionHelpFormatter,
    epilog="\n\n".join(__doc__.split("\n\n")[1:]),
  )
  parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
  parser.add_argument("--out", help="folder for the table and plots")
  args = parser.parse_args(argv)
  try:
    write_report(*args.run_dirs, out_dir=args.out)
  except FedVPError as err:
    print(f"error: {err}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
