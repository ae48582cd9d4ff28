"""``python -m reference``: same as ``orchestrator-reference``."""

import sys

from reference.cli import main

sys.exit(main())
