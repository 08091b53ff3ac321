"""``python -m attacks``: see attacks/cli.py."""
import sys

from .cli import main

sys.exit(main())
