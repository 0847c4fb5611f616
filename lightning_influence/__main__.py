"""``python -m lightning_influence``: the ``lightning-influence`` command line."""

import sys

from lightning_influence.cli import main

if __name__ == "__main__":
    sys.exit(main())
