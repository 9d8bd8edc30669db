"""`python -m vitlens`: the command line."""

import sys

from vitlens.cli import main

sys.exit(main())
