"""tests/integration/test_ssrf_sender.py, every test as it is, against the pinned sender
(pyreqwest) instead of delivery.Sender (sidecar.http1).

Its connect() guard cannot see the Rust client's sockets; what keeps those tests off the network
is that every address the pinned client is given has passed the policy, and that the blocked
ranges are only ever named by the fake resolver, never connected to when the check works.
"""

from __future__ import annotations

import pytest

import tests.integration.test_ssrf_sender as suite
from sidecar.pinned_sender import PinnedSender
from tests.integration.test_ssrf_sender import (  # noqa: F401 - collected and used here again
    loopback_only,
    test_allow_list_lets_loopback_through,
    test_loopback_literals_never_connect,
    test_names_resolving_to_internal_ranges_are_blocked,
    test_names_resolving_to_loopback_never_connect,
    test_only_allowed_addresses_of_a_mixed_answer_are_used,
    test_redirects_are_not_followed,
    test_socket_factory_checks_the_connected_address_even_if_resolution_is_bypassed,
    trap,
)


@pytest.fixture(autouse=True)
def pinned(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(suite, "Sender", PinnedSender)
