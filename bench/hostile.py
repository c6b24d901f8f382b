"""Entry point: ``python bench/hostile.py --broker tcp://127.0.0.1:5557 --seconds 60``
runs every hostile-peer attack against a running broker (see broker/bench/hostile.py)."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from broker.bench.hostile import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
