"""``python -m kpt ...`` (and ``torchrun -m kpt train ...``) run the ``kpt`` command line."""

import sys

from kpt.cli import main

if __name__ == "__main__":
    sys.exit(main())
