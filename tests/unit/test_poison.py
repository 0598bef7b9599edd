"""Isolating rows PostgreSQL refuses: storable text, which errors split a batch, bisection, quarantine."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Sequence

import psycopg
import psycopg.errors
import pytest
from psycopg_pool import PoolTimeout

from sidecar.poison import bisect_write, clip, is_data_error, storable, storable_row, storable_text
from sidecar.recorder import UNRECORDABLE, Outcome, quarantined
from sidecar.rows import ATTEMPT_COLUMNS, AttemptRow, DeadLetter, RetryUpdate, Source


@pytest.mark.parametrize(
    ("text", "stored"),
    [
        ("plain", "plain"),
        ("a\x00b", "a\\u0000b"),
        ("\x00\x00", "\\u0000\\u0000"),
        ("\ud800", "\\ud800"),
        ("x\udfffy\x00", "x\\udfffy\\u0000"),
        ("ünïcode ✓ 😀", "ünïcode ✓ 😀"),
        ("é\x00", "é\\u0000"),
        ("", ""),
    ],
)
def test_storable_text_escapes_only_what_postgresql_refuses(text: str, stored: str) -> None:
    assert storable_text(text) == stored
    stored.encode("utf-8")  # encodable, and no NUL left
    assert "\x00" not in stored


def test_storable_text_returns_clean_text_unchanged() -> None:
    text = "order-42" * 10
    assert storable_text(text) is text


def test_storable_copies_nested_values_and_leaves_the_original_alone() -> None:
    headers = {"X-A\x00": ["v\ud800", 1, None], "B": {"c": "\x00"}}
    out = storable(headers)
    assert out == {"X-A\\u0000": ["v\\ud800", 1, None], "B": {"c": "\\u0000"}}
    assert headers == {"X-A\x00": ["v\ud800", 1, None], "B": {"c": "\x00"}}
    assert storable_row(("a\x00", 1, None, b"\x00")) == ("a\\u0000", 1, None, b"\x00")  # bytes stay bytes


def test_clip_marks_what_it_cut() -> None:
    assert clip("short", 10) == "short"
    assert clip(None, 10) is None
    cut = clip("x" * 1000, 100)
    assert cut is not None and len(cut) <= 100 and cut.endswith("(1000 chars)")


@pytest.mark.parametrize(
    ("exc", "split"),
    [
        (psycopg.errors.CharacterNotInRepertoire("NUL"), True),
        (psycopg.errors.UntranslatableCharacter("\\u0000 in jsonb"), True),
        (psycopg.errors.NumericValueOutOfRange("bigint"), True),
        (psycopg.errors.CheckViolation("reason"), True),
        (psycopg.errors.ProgramLimitExceeded("index row too large"), True),
        (psycopg.DataError("PostgreSQL text fields cannot contain NUL (0x00) bytes"), True),
        (UnicodeEncodeError("utf-8", "\ud800", 0, 1, "surrogates not allowed"), True),
        (OverflowError("int too big"), True),
        (psycopg.OperationalError("connection lost"), False),
        (PoolTimeout("no connection in 30 s"), False),
        (psycopg.InterfaceError("connection closed"), False),
        (psycopg.errors.AdminShutdown("shutting down"), False),
        (psycopg.errors.SerializationFailure("retry"), False),
        (psycopg.errors.InsufficientPrivilege("permission denied"), False),
        (psycopg.errors.UndefinedTable("no table"), False),
        (RuntimeError("a bug"), False),
    ],
)
def test_only_data_errors_split_a_batch(exc: BaseException, split: bool) -> None:
    assert is_data_error(exc) is split


class FakeDb:
    """Commits a part unless it holds a bad item; can fail like a lost connection after n commits."""

    def __init__(self, bad: set[int], lose_connection_after: int | None = None) -> None:
        self.bad = bad
        self.lose_after = lose_connection_after
        self.committed: list[int] = []
        self.calls = 0

    async def write(self, part: Sequence[int]) -> None:
        self.calls += 1
        if self.lose_after is not None and len(self.committed) >= self.lose_after:
            raise psycopg.OperationalError("connection lost")
        if self.bad & set(part):
            raise psycopg.errors.CharacterNotInRepertoire("invalid byte sequence")
        self.committed.extend(part)


async def test_bisect_finds_the_bad_items_and_commits_the_rest_in_order() -> None:
    db = FakeDb(bad={3, 7})
    poisoned: list[int] = []

    async def on_poison(item: int, exc: Exception) -> None:
        assert isinstance(exc, psycopg.DataError)
        poisoned.append(item)

    await bisect_write(list(range(10)), db.write, on_poison)
    assert poisoned == [3, 7]
    assert db.committed == [0, 1, 2, 4, 5, 6, 8, 9]


async def test_bisect_clean_batch_is_one_write() -> None:
    db = FakeDb(bad=set())

    async def on_poison(item: int, exc: Exception) -> None:
        raise AssertionError("no poison")

    await bisect_write(list(range(100)), db.write, on_poison)
    assert db.calls == 1 and db.committed == list(range(100))


async def test_bisect_cost_is_logarithmic_for_one_bad_item() -> None:
    db = FakeDb(bad={500})
    poisoned: list[int] = []

    async def on_poison(item: int, exc: Exception) -> None:
        poisoned.append(item)

    await bisect_write(list(range(1000)), db.write, on_poison)
    assert poisoned == [500] and len(db.committed) == 999
    assert db.calls <= 2 * 11


async def test_bisect_stops_at_an_error_that_is_not_about_the_data() -> None:
    db = FakeDb(bad={1}, lose_connection_after=3)

    async def on_poison(item: int, exc: Exception) -> None:
        pass

    with pytest.raises(psycopg.OperationalError):
        await bisect_write(list(range(8)), db.write, on_poison)
    assert db.committed == [0, 2, 3]  # 1 went to on_poison; the caller re-queues 4..7


def source() -> Source:
    return Source("id\x00" + "x" * 500, "S", "c", 7, "subj", b'{"raw": 1}', {"H": "v"}, 3, "http://e/x")


def attempt_row(outcome: str, status: int | None) -> AttemptRow:
    row: dict[str, object] = dict.fromkeys(ATTEMPT_COLUMNS)
    row.update(outcome=outcome, http_status=status)
    return AttemptRow(**row)  # type: ignore[arg-type]


async def test_quarantined_outcome_keeps_the_bytes_and_says_what_it_was() -> None:
    committed: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
    original = Outcome(
        attempt=attempt_row("delivered", 200),
        retry_update=RetryUpdate(41, 2, None, None),  # type: ignore[arg-type]
        source=source(),
        committed=committed,
    )
    q = quarantined(original, psycopg.errors.ProgramLimitExceeded("index row requires 20016 bytes"))
    assert q is not None and q.dead_letter is not None
    d = q.dead_letter
    assert d.reason == UNRECORDABLE and d.message_raw == b'{"raw": 1}'
    assert "delivered, HTTP 200" in d.error and "index row requires" in d.error
    assert len(d.message_id) <= 200 and d.message_headers is None
    assert q.attempt is None and q.retry_delete == 41  # the retry row must not come back
    assert q.committed is committed  # the message is still acknowledged once the dead letter commits
    params = d.params()
    assert "\x00" not in params["message_id"]
    assert quarantined(Outcome(retry_delete=5), ValueError("x")) is None  # nothing to keep


def test_dead_letter_params_are_new_values_every_time() -> None:
    headers = {"X-Trace\x00": "t"}
    d = DeadLetter(
        "m", "S", "c", 1, "s", None, None, b"raw", headers, "http_4xx", "HTTP 400", 1,
        dt.datetime.now(dt.UTC), None,
    )  # fmt: skip
    first, second = d.params(), d.params()
    assert first["message_headers"].obj == {"X-Trace\\u0000": "t"}
    assert second["message_headers"].obj == first["message_headers"].obj
    assert headers == {"X-Trace\x00": "t"}  # the row's own value is untouched
    with pytest.raises(AttributeError):
        d.reason = "x"  # type: ignore[misc]


def test_a_clean_row_is_returned_as_it_is() -> None:
    from sidecar.poison import storable_row

    row = ("m1", 3, None, "https://e.example/x", 2.5)
    assert storable_row(row) is row
    assert storable_row(("a\x00b", 1)) == ("a\\u0000b", 1)
    assert storable_row(("ü\ud800", "ok")) == ("ü\\ud800", "ok")
