"""Allow ``python -m fmadapt`` (used by ``accelerate launch -m fmadapt``)."""

import sys

from fmadapt.cli import main

sys.exit(main())
