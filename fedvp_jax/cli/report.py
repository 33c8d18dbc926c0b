"""fedvp report: redraw the results table and plots of finished runs from their saved
metrics alone.

Examples:
  fedvp report sweeps/weekly
  fedvp report runs/fedavg_A runs/fedgen_B --out reports/ab

Each RUN_DIR is a run directory or a folder of them (a sweep folder keeps its order and
groups). Writes results.md, results.csv and the plots into --out (default: the one folder
given).
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
  from fedvp_jax.cli.common import command, command_parser

  parser = command_parser(__doc__, prog)
  parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
  parser.add_argument("--out", help="folder for the table and plots")
  args = parser.parse_args(argv)

  def body() -> int:
    from fedvp_jax.report import write_report

    write_report(*args.run_dirs, out_dir=args.out)
    return 0

  return command(body)


__all__ = ["main"]

if __name__ == "__main__":
  sys.exit(main())
