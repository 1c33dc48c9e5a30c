"""``python -m graphopt``: the command line."""

import sys

from graphopt.app.cli import main

if __name__ == "__main__":
    sys.exit(main())
