"""The table of validation cases (tests/security/cases.py) against SQL and PL/Python.

The sidecar's implementation runs the same table in test_sidecar_validation.py. SQL is asked
in the real server (the CHECK constraints use these functions) and the PL/Python module both
imported here and inside PostgreSQL, where it really runs.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import psycopg
import pytest

from tests.security.cases import CASES, KINDS, Case

REPO = Path(__file__).resolve().parents[2]

SQL = {
    "subject": "SELECT public.rule_nats_valid_subject(%(v)s, false) AND NOT public.rule_nats_subject_reserved(%(v)s)",
    "subject_filter": "SELECT public.rule_nats_valid_subject(%(v)s, true) AND NOT public.rule_nats_subject_reserved(%(v)s)",
    "header_name": "SELECT public.rule_nats_valid_header_name(%(v)s)",
    "header_value": "SELECT public.rule_nats_valid_header_value(%(v)s)",
    "message_id": "SELECT public.rule_nats_valid_message_id(%(v)s)",
    "caller_message_id": "SELECT public.rule_nats_valid_message_id(%(v)s) AND NOT public.rule_nats_message_id_reserved(%(v)s)",
    "nats_header_name": "SELECT public.rule_nats_valid_header_name(%(v)s) AND public.rule_nats_nats_header_allowed(%(v)s)",
    "webhook_url": "SELECT public.rule_nats_valid_webhook_url(%(v)s)",
    "nats_url": "SELECT public.rule_nats_valid_server_url(%(v)s)",
}

PY = {
    "subject": "validate_subject(v)",
    "subject_filter": "validate_subject(v, wildcards=True)",
    "header_name": "validate_header_name(v)",
    "header_value": "validate_header_value(v)",
    "message_id": "validate_message_id(v)",
    "caller_message_id": "validate_caller_message_id(v)",
    "nats_header_name": "validate_nats_header_name(v)",
    "webhook_url": "validate_webhook_url(v)",
    "nats_url": "validate_server_url(v)",
}


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("pgnats_rules", REPO / "plpython" / "pgnats.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


pgnats = _load()


def _ids(case: Case) -> str:
    return f"{case.kind}:{case.value[:40]!r}"


def test_every_kind_has_cases_and_runners() -> None:
    assert {c.kind for c in CASES} == set(KINDS) == SQL.keys() == PY.keys()


@pytest.fixture
def conn(database_url: str) -> Iterator[psycopg.Connection]:
    with psycopg.connect(database_url, autocommit=True) as c:
        yield c


def test_sql(conn: psycopg.Connection) -> None:
    """Every case in one database (a database per case would cost seconds)."""
    wrong = []
    for case in CASES:
        if "\x00" in case.value:
            continue  # PostgreSQL text cannot hold NUL: refused before any rule runs
        row = conn.execute(SQL[case.kind], {"v": case.value}).fetchone()
        if row != (case.valid,):
            wrong.append((case.kind, case.value[:60], case.why, row))
    assert wrong == []


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_plpython_module(case: Case) -> None:
    try:
        eval(PY[case.kind], {"v": case.value, **vars(pgnats)})  # noqa: S307 - fixed expressions above
    except pgnats.NatsError:
        assert not case.valid, case.why
    else:
        assert case.valid, case.why


def test_plpython_inside_postgres(conn: psycopg.Connection) -> None:
    """The module as PostgreSQL loads it (the embedded copy), all cases in one call."""
    cases = [c for c in CASES if "\x00" not in c.value]
    conn.execute(
        "CREATE OR REPLACE FUNCTION pg_temp.rules(kinds text[], vals text[]) RETURNS boolean[] "
        "LANGUAGE plpython3u AS $$\n"
        "import types\n"
        "src = plpy.execute('SELECT public.rule_nats__pgnats_source() AS s')[0]['s']\n"
        "m = types.ModuleType('m'); exec(compile(src, 'pgnats.py', 'exec'), m.__dict__)\n"
        "exprs = " + repr(PY) + "\n"
        "out = []\n"
        "for k, v in zip(kinds, vals):\n"
        "    try:\n"
        "        eval(exprs[k], {'v': v, **vars(m)}); out.append(True)\n"
        "    except m.NatsError:\n"
        "        out.append(False)\n"
        "return out\n$$"
    )
    row = conn.execute(
        "SELECT pg_temp.rules(%s, %s)", ([c.kind for c in cases], [c.value for c in cases])
    ).fetchone()
    assert row is not None
    wrong = [(c.kind, c.value[:60], c.why) for c, ok in zip(cases, row[0], strict=True) if ok != c.valid]
    assert wrong == []


MATCHES = [
    ("a.>", "a.b", True),
    ("a.>", "a", False),
    ("a.>", "a.b.c", True),
    ("a.*", "a.b", True),
    ("a.*", "a.b.c", False),
    ("*.b.>", "x.b.c", True),
    ("*.b.>", "x.b", False),
    ("a.b", "a.b", True),
    ("a.b", "a.c", False),
    (">", "x", True),
    ("a$.*", "a$.x", True),
    ("a+.*", "aa.x", False),
    ("*", "x.y", False),
    ("Ü.*", "Ü.x", True),
    ("a[b.*", "a[b.c", True),
    ("ab.>", "a.b.c", False),
]


def test_subject_matching_agrees(conn: psycopg.Connection) -> None:
    """Which stream captures a subject (publish_registered_subjects_only), in SQL and PL/Python."""
    for pattern, subject, expected in MATCHES:
        assert pgnats.subject_matches(pattern, subject) is expected, (pattern, subject)
        row = conn.execute(
            "SELECT public.rule_nats_subject_matches(%s, %s), %s ~ public.rule_nats_subjects_pattern(ARRAY[%s])",
            (pattern, subject, subject, pattern),
        ).fetchone()
        assert row == (expected, expected), (pattern, subject)
