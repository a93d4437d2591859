"""``python -m distcomp``: the same as the ``distcomp`` command."""

import sys

from distcomp.cli import main

if __name__ == "__main__":
    sys.exit(main())
