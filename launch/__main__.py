"""``python -m distcomp.launch``: the same as ``distcomp launch`` (how SLURM steps re-enter the launcher)."""

import sys

from distcomp.launch.cli import main

if __name__ == "__main__":
    sys.exit(main())
