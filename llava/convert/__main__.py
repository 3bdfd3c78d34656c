"""Runs the converter's command line (llava.convert.cli) for `python -m llava.convert`."""

import sys

from llava.convert.cli import main

if __name__ == "__main__":
    sys.exit(main())
