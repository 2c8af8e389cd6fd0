"""``python -m optimum_a3 ...`` (also ``torchrun --nproc-per-node N -m optimum_a3 compress ...``): the CLI."""

import sys

from .cli import main

sys.exit(main())
