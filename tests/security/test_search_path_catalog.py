"""Every function a CHECK constraint or a SECURITY DEFINER function calls pins its search_path.

A CHECK runs in the writer's session: a SQL function it calls is parsed with the writer's
search_path, so an operator ``~`` or a function ``length`` the writer created in a schema listed
before pg_catalog (``SET search_path = mine, pg_catalog``) decided what the registry accepted
(issue 19, defect 11). The same holds for helpers a definer function calls when they are not
definers themselves. ``SET search_path = pg_catalog, pg_temp`` on each of them closes that.

Which functions: those a CHECK or a generated column depends on (pg_depend), those whose name appears in the body of a
definer function, and, transitively, those whose name appears in the body of any function found
so far (a SQL helper that calls another helper); for an aggregate, its support functions.
"""

from __future__ import annotations

import re

import psycopg

PINNED = ["search_path=pg_catalog, pg_temp"]


def _called_functions(conn: psycopg.Connection) -> dict[str, tuple[str, list[str] | None]]:
    """signature -> (why it is listed, proconfig) for every function that must pin search_path."""
    ours = conn.execute(
        """
        SELECT p.oid::regprocedure::text, p.proname,
               -- an aggregate runs its support functions: walk to them
               CASE WHEN p.prokind = 'a'
                    THEN (SELECT concat_ws(' ', a.aggtransfn::regproc || '(', nullif(a.aggfinalfn, 0)::regproc || '(',
                                           nullif(a.aggcombinefn, 0)::regproc || '(')
                            FROM pg_aggregate a WHERE a.aggfnoid = p.oid)
                    ELSE p.prosrc END,
               p.prosecdef, CASE WHEN p.prokind = 'a' THEN ARRAY['aggregate'] ELSE p.proconfig END
          FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
         WHERE n.nspname IN ('public', 'rule_nats_private')
           AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.objid = p.oid AND d.deptype = 'e')
        """
    ).fetchall()
    by_name: dict[str, list[tuple[str, str, list[str] | None]]] = {}
    for signature, name, src, _, config in ours:
        by_name.setdefault(name, []).append((signature, src, config))
    checks = conn.execute(
        """
        SELECT DISTINCT d.refobjid::regprocedure::text, c.conrelid::regclass::text
          FROM pg_constraint c
          JOIN pg_depend d ON d.classid = 'pg_constraint'::regclass AND d.objid = c.oid
                          AND d.refclassid = 'pg_proc'::regclass
         WHERE c.contype = 'c'
        UNION
        SELECT DISTINCT d.refobjid::regprocedure::text, a.adrelid::regclass::text
          FROM pg_attrdef a
          JOIN pg_depend d ON d.classid = 'pg_attrdef'::regclass AND d.objid = a.oid
                          AND d.refclassid = 'pg_proc'::regclass
        """
    ).fetchall()
    found: dict[str, tuple[str, list[str] | None]] = {}
    todo: list[tuple[str, str]] = []  # (signature, why)
    for signature, table in checks:
        todo.append((signature, f"a CHECK or generated column of {table}"))
    for signature, _, _, secdef, _ in ours:
        if secdef:
            todo.append((signature, "a definer function"))
    config_of = {sig: cfg for sig, _, _, _, cfg in ours}
    src_of = {sig: src for sig, _, src, _, _ in ours}
    seen: set[str] = set()
    while todo:
        signature, why = todo.pop()
        if signature in seen:
            continue
        seen.add(signature)
        if why != "a definer function" and config_of.get(signature) != ["aggregate"]:
            found[signature] = (why, config_of.get(signature))
        body = src_of.get(signature, "")
        for name in set(
            re.findall(r"\b(rule_nats_\w+|rule_webhook\w*|random_secret|enable_failure_log)\s*\(", body)
        ):
            for callee, _, _ in by_name.get(name, []):
                if callee not in seen:
                    todo.append((callee, f"called by {signature}"))
    return found


def test_every_function_a_check_or_a_definer_calls_pins_search_path(database_url: str) -> None:
    with psycopg.connect(database_url) as conn:
        found = _called_functions(conn)
    # The walk must find the validation helpers, or it proves nothing.
    assert "rule_nats_valid_subject(text,boolean)" in found
    assert "rule_nats__check_publish(text,text,text,jsonb,text)" in found
    unpinned = sorted(f"{sig} ({why})" for sig, (why, config) in found.items() if config != PINNED)
    assert unpinned == []


def test_an_operator_of_the_writer_does_not_decide_a_check(database_url: str) -> None:
    """The attack itself: operators ~, ~* and !~ in the writer's schema, ahead of pg_catalog, that
    say 'true' for everything made a webhook URL with a space and a wildcard subject pass the CHECKs."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("CREATE SCHEMA evil")
        conn.execute("CREATE FUNCTION evil.always(text, text) RETURNS boolean LANGUAGE sql AS 'SELECT true'")
        for op in ("~", "~*", "!~"):
            conn.execute(
                f"CREATE OPERATOR evil.{op} (LEFTARG = text, RIGHTARG = text, FUNCTION = evil.always)"
            )
        conn.execute("SET search_path = evil, pg_catalog, public")
        assert conn.execute("SELECT 'a b' !~ ' '").fetchone() == (True,), "the operator is in effect"
        for bad in ("http://host/a b", "ftp://host/"):
            assert conn.execute("SELECT rule_nats_valid_webhook_url(%s)", (bad,)).fetchone() == (False,), bad
        assert conn.execute("SELECT rule_nats_valid_subject('a.*.b', false)").fetchone() == (False,)
        try:
            conn.execute(
                "INSERT INTO public.rule_webhooks (webhook_name, url, nats_subject) "
                "VALUES ('evil', 'ftp://host/a b', 'a.*.b')"
            )
        except psycopg.errors.CheckViolation:
            pass
        else:
            raise AssertionError("the CHECKs accepted ftp://host/a b and a.*.b")
