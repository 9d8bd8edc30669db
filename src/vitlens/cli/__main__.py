"""`python -m vitlens.cli`."""

import sys

from vitlens.cli import main

sys.exit(main())
