"""``python -m server`` is the same as the ``orchestrator`` command."""

import sys

from server.cli import main

sys.exit(main())
