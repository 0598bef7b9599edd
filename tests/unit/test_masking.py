"""The webhook's own secrets are masked in what its endpoint answered (sidecar/masking.py)."""

from __future__ import annotations

import pytest

from sidecar.masking import MASK, mask, secret_values

SENT = {
    "Content-Type": "application/json",
    "Authorization": "Bearer tok-0123456789",
    "X-Api-Key": "k-abcdef",
    "X-Short-Token": "abc",
    "X-Trace": "trace-visible-1",
}
STATIC = (("X-Tenant-Secret-Value", "tenant-pass-42"), ("X-Plain", "static-value-7"))

CASES = [
    ('{"got": "Bearer tok-0123456789"}', f'{{"got": "{MASK}"}}'),
    ('{"token": "tok-0123456789"}', f'{{"token": "{MASK}"}}'),  # the credentials alone
    ("key k-abcdef refused", f"key {MASK} refused"),
    ("static-value-7 and tenant-pass-42", f"{MASK} and {MASK}"),  # static headers: all of them
    ("trace-visible-1 application/json", "trace-visible-1 application/json"),  # not secret
    ("abc Bearer", "abc Bearer"),  # too short to mask / the scheme alone
    ("", ""),
]


@pytest.mark.parametrize(("text", "expected"), CASES)
def test_mask(text: str, expected: str) -> None:
    assert mask(text, secret_values(SENT, STATIC)) == expected


def test_nothing_to_mask_returns_the_text_itself() -> None:
    assert mask(None, ("secret-1",)) is None
    assert mask("x", ()) == "x"


def test_longest_first() -> None:
    found = secret_values({"Authorization": "Bearer tok-0123456789"}, ())
    assert found == ("Bearer tok-0123456789", "tok-0123456789")
