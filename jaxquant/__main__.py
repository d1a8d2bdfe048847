"""`python -m jaxquant ...` runs the `jaxquant` command (e.g. `python -m jaxquant quantize`)."""

import sys

from jaxquant.cli import main

sys.exit(main())
