#!/usr/bin/env python3
"""``fedvp report``, for a checkout without the console script (see fedvp_jax/cli/report.py)."""

import sys

from fedvp_jax.cli.report import main

if __name__ == "__main__":
  sys.exit(main())
