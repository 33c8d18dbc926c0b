#!/usr/bin/env python3
"""``fedvp sweep``, for a checkout without the console script (see fedvp_jax/cli/sweep.py)."""

import sys

from fedvp_jax.cli.sweep import main

if __name__ == "__main__":
  sys.exit(main())
