"""plpython/pgnats.py imported as a plain module (its pure helpers: NKEY seeds, ed25519, JWT signing)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

_REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("pgnats_for_tests", _REPO / "plpython" / "pgnats.py")
assert _spec and _spec.loader
pgnats = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(pgnats)
