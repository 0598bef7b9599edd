"""The sidecar as a real subprocess: the class and helpers live in tests/support, the fixtures
(``sidecar_factory``, ``worker_database_url``) in tests/conftest.py. The names below stay importable
from here for test files that still import them from this module."""

from __future__ import annotations

from tests.support.registry import scalar
from tests.support.sidecar import Sidecar
from tests.support.waits import wait_until

__all__ = ["Sidecar", "scalar", "wait_until"]
