"""C{python -m qbportsync}: the same as the C{qb-port-sync} command."""

from qbportsync.cli import run

run()
