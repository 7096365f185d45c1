"""The Python host of pgt's raw ABI (`pgt_abi.py`) ships with the Python example; the tests use it from
there."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples" / "python"))
