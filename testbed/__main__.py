"""``python -m testbed``: see testbed/cli/__init__.py."""
from .cli import main
from .console import entry

raise SystemExit(entry(main))
