"""framebroker's tcp subscriber against imagezmq, pickle and raw pyzmq (see broker/bench/peers.py)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from broker.bench.peers import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
