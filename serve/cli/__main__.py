"""`python -m slotserve.cli` runs the `slotserve` command."""

import sys

from slotserve.cli import main

sys.exit(main())
