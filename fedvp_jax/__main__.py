"""``python -m fedvp_jax train | sweep | report``: the ``fedvp`` command."""

import sys

from fedvp_jax.cli import main

sys.exit(main())
