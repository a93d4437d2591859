"""``python -m distcomp.check gpu``."""

from distcomp.check import main

raise SystemExit(main())
