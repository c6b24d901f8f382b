"""``python bench/live_record.py``: see broker/bench/live_record.py."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from broker.bench.live_record import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
