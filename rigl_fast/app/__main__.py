"""`python -m rigl_fast.app` runs the `rigl-fast` command."""
import sys

from .cli import main

sys.exit(main())
