"""The FFT worker's BGR -> gray conversion against OpenCV's (see broker/bench/gray.py)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from broker.bench.gray import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
