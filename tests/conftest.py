"""Shared test set-up: make `tests/peers.py` importable as `peers` from every test module."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
