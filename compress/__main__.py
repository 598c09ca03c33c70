"""`python -m compress ...`: the same command line as the `compress` script (compress.cli.main)."""
import sys

from .cli import main

sys.exit(main())
