"""``python bench/shutdown.py [--help]`` from a clone: the code is broker/bench/shutdown.py (also
reachable from an installed framebroker as ``python -m broker.bench.shutdown``)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this clone's broker

from broker.bench.shutdown import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
