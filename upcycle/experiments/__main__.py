"""``python -m upcycle.experiments --worker SPEC.json``: one run of a comparison, in a process of its own (internal)."""

from __future__ import annotations

import sys

from upcycle.experiments.runner import worker_main

if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1:]))
