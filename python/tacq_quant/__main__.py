"""``python -m tacq_quant`` runs the ``tacq`` command line."""

import sys

from .cli import main

sys.exit(main())
