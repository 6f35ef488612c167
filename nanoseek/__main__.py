"""`python -m nanoseek ...`: the command line, also as torchrun's module (`torchrun --nproc-per-node N -m nanoseek
train ...`)."""

import sys

from .cli import main

sys.exit(main())
