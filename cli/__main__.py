"""`python -m oodguard.cli`: the `oodguard` command."""

import sys

from . import main

sys.exit(main())
