"""`python -m visiontune ...` (and `torchrun -m visiontune ...`) run the command line."""

import sys

from visiontune.cli import main

sys.exit(main())
