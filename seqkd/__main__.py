"""``python -m seqkd`` (and ``accelerate launch -m seqkd``): the ``seqkd`` command."""

import sys

from seqkd.cli import main

sys.exit(main())
