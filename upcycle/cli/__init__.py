"""The `upcycle` command line: parsing and presentation only; the work happens in the library.

One module per command group registers its commands on the one Typer app (`upcycle.cli.app`), in the order
`upcycle --help` lists them.
"""

# ruff: noqa: I001, F401  (imported for their registrations, in the order of the help)
from upcycle.cli import convert, grow, merge, verify, evaluate, train, experiments, demo, cache
from upcycle.cli.app import app

__all__ = ["app"]
