"""Recorder scaling benchmark: aggregate lossless MB/s with 1, 2 and 4 shard writers.

A thin entry point: the measuring code is broker/bench/shards.py (see its docstring).
``python bench/shards.py --out shards.json`` (``--quick`` for a short run).
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from broker.bench.shards import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
