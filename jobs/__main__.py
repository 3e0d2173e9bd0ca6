"""`python -m jobs` is the `rungwise` command."""

import sys

from jobs.cli import main

sys.exit(main())
