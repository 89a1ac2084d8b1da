"""Benchmarks against the official transformers backend; see qasr/bench.py (also `qasr bench`).

    python scripts/bench.py [--models 0.6b 1.7b] [--seconds 10 60 300] [--repeats 3]
"""

import sys

from qasr.bench import main

if __name__ == "__main__":
    sys.exit(main())
