"""Benchmark harness entry point: ``python benchmarks/run.py [SCENARIO...] [--tiny] [--repeat N]``.

Scenarios: rest-limit, rest-wan, rest-latency, cstore, discover, scale (default: all).
See docs/performance.md.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    # Run as a script: make the repository root importable so ``benchmarks`` is a package.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.cli import main

if __name__ == "__main__":
    sys.exit(main())
