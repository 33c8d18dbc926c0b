#!/usr/bin/env python3
"""``fedvp train``, for a checkout without the console script (see fedvp_jax/cli/train.py)."""

import sys

from fedvp_jax.cli.train import main

if __name__ == "__main__":
  sys.exit(main())
