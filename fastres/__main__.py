"""`python -m fastres bench|check`: the same as the `fastres` console script."""
import sys

from fastres.cli import main

sys.exit(main())
