"""`python -m vitlens.cli`."""

import sys

from vitlens.cli.main import main

sys.exit(main())
