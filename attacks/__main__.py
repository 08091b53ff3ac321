"""``python -m attacks``: see attacks/cli.py."""
import sys

from testbed.console import entry

from .cli import main

sys.exit(entry(main))
