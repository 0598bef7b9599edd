"""Every function of the schema, its security mode and who may call it, checked in the catalog.

A new SQL function must get a row in FUNCTIONS (the test fails until it does): that row is the
review of what it exposes. SECURITY DEFINER functions must be owned by rule_nats_definer (NOLOGIN,
not a superuser) and pin search_path to pg_catalog, pg_temp, so that no object a caller can create
is looked up with the definer's rights.
"""

from __future__ import annotations

import psycopg
import pytest

P, M, W, A = "rule_nats_publisher", "rule_nats_monitor", "rule_nats_worker", "rule_nats_admin"
FW = "rule_nats_failure_writer"
D = "rule_nats_definer"  # invoker helpers that definer functions call
ANY = "PUBLIC"

# name -> (security definer?, roles that hold EXECUTE besides the owner and superusers)
FUNCTIONS: dict[str, tuple[bool, frozenset[str]]] = {
    # validation helpers: pure, immutable, read nothing
    "rule_nats_valid_name": (False, frozenset({ANY})),
    "rule_nats_valid_subject": (False, frozenset({ANY})),
    "rule_nats_valid_subjects": (False, frozenset({ANY})),
    "rule_nats_valid_server_url": (False, frozenset({ANY})),
    "rule_nats_valid_server_urls": (False, frozenset({ANY})),
    "rule_nats_subject_reserved": (False, frozenset({ANY})),
    "rule_nats_subjects_reserved": (False, frozenset({ANY})),
    "rule_nats_valid_header_name": (False, frozenset({ANY})),
    "rule_nats_valid_header_value": (False, frozenset({ANY})),
    "rule_nats_valid_headers": (False, frozenset({ANY})),
    "rule_nats_valid_message_id": (False, frozenset({ANY})),
    "rule_nats_valid_webhook_url": (False, frozenset({ANY})),
    "rule_nats_subject_matches": (False, frozenset({ANY})),
    "rule_nats_subjects_pattern": (False, frozenset({ANY})),
    "rule_nats_subjects_overlap": (False, frozenset({ANY})),
    "rule_nats_redact_url": (False, frozenset({ANY})),
    "rule_nats_message_id_reserved": (False, frozenset({ANY})),
    "rule_nats_nats_header_allowed": (False, frozenset({ANY})),
    "rule_nats_valid_nats_headers": (False, frozenset({ANY})),
    "rule_nats_nats_headers_allowed": (False, frozenset({ANY})),
    "rule_nats_latency_bucket": (False, frozenset({ANY})),
    "rule_nats_hist_add": (False, frozenset({ANY})),
    "rule_nats_hist_merge": (False, frozenset({ANY})),
    "rule_nats_hist_quantile": (False, frozenset({ANY})),
    "rule_nats_hist_agg": (False, frozenset({ANY})),
    "rule_nats_hist_sum": (False, frozenset({ANY})),
    # trigger functions (called by the table's own triggers only)
    "rule_nats_touch_updated_at": (False, frozenset()),
    "rule_nats_notify_config_change": (False, frozenset()),
    "rule_nats_outbox_notify": (False, frozenset()),
    "rule_nats_endpoint_state_notify": (False, frozenset()),
    "rule_nats__config_invalidate": (False, frozenset()),
    "rule_nats_streams_check_overlap": (False, frozenset()),
    "rule_nats__flush_history": (True, frozenset()),
    "rule_nats_webhook_enabled": (True, frozenset()),
    "rule_nats_rollup_attempts": (True, frozenset()),
    "rule_nats_rollup_publishes": (True, frozenset()),
    # publishing
    "rule_nats_table_trigger": (False, frozenset({P, A})),
    "rule_nats_enqueue_row_event": (True, frozenset({P, A})),
    "rule_nats_try_publish": (True, frozenset({P, A})),
    "rule_nats_publish": (True, frozenset({P, A})),
    "rule_nats_publish_on_commit": (True, frozenset({P, A})),
    "rule_webhook_publish_nats": (True, frozenset({P, A})),
    "rule_nats_health_check": (True, frozenset({P, M, A})),
    "rule_nats__load": (False, frozenset({D})),
    "rule_nats__pgnats_source": (False, frozenset({D})),
    "rule_nats__record_failure_autonomously": (False, frozenset({D})),
    "rule_nats__insert_failure": (True, frozenset({FW})),
    "rule_nats__check_publish": (False, frozenset({D})),
    "rule_nats__publish_args_valid": (False, frozenset({ANY})),
    "rule_nats__raise": (False, frozenset({D})),
    "rule_nats__null_argument": (False, frozenset({D})),
    "rule_nats__publish": (False, frozenset({D})),
    "rule_nats__webhook_publish": (False, frozenset({D})),
    "enable_failure_log": (False, frozenset()),  # superusers only
    # delivery, endpoints, secrets
    "rule_nats_consumer_update_stats": (False, frozenset({W, A})),
    "rule_nats_consumer_add_stats": (False, frozenset({W, A})),
    "rule_nats_register_consumer": (True, frozenset({W, A})),
    "rule_nats_adopt_consumer": (True, frozenset({W, A})),
    "rule_nats_replay_dead_letter": (True, frozenset({A})),
    "rule_nats_replay_dead_letters": (True, frozenset({A})),
    "rule_nats_endpoint_disable": (True, frozenset({W, A})),
    "rule_nats_endpoint_enable": (True, frozenset({A})),
    "rule_webhook_secret_create": (True, frozenset({A})),
    "rule_webhook_secret_rotate": (True, frozenset({A})),
    "rule_webhook_secret_revoke": (True, frozenset({A})),
    "random_secret": (False, frozenset({D})),
    # operations
    "rule_nats_refresh_status": (True, frozenset({M, A})),
    "rule_nats_purge_batch": (True, frozenset({A})),
    "rule_nats_purge_due": (True, frozenset({W, A})),
    "rule_nats_purge": (False, frozenset({A})),
    "rule_nats_outbox_retry": (True, frozenset({A})),
    "rule_nats_failure_log_check": (True, frozenset({M, A})),
    # the original rule-engine-postgres API (0014_compat)
    "rule_nats__config_compat": (False, frozenset()),
    "rule_nats__config_ref_compat": (False, frozenset()),
    "rule_nats__webhook_compat": (False, frozenset()),
    "rule_nats_configure": (False, frozenset({A})),
    "rule_nats_stream_create": (False, frozenset({A})),
    "rule_webhook_enable_nats": (False, frozenset({A})),
    "rule_webhook_disable_nats": (False, frozenset({A})),
    "rule_nats_stats": (False, frozenset({A})),
    "rule_nats_config_info": (False, frozenset({A})),
    "rule_nats_webhooks_list": (False, frozenset({A})),
    "rule_nats_cleanup_expired": (False, frozenset({A})),
    "rule_nats_cleanup_old_history": (False, frozenset({A})),
    "rule_nats_init": (True, frozenset({A})),
    "rule_nats_test_connection": (True, frozenset({M, A})),
    "rule_nats__webhook_publish_as": (False, frozenset({D})),
    "rule_webhook_call_unified": (True, frozenset({P, A})),
    # isolation (0017): which role to grant here; superusers move grants and uninstall
    "rule_nats_role": (False, frozenset({P, M, W, A, D})),  # names roles only
    "rule_nats__guard_file_paths": (False, frozenset()),
    "failure_log_connection": (False, frozenset({D})),
    "isolate": (False, frozenset()),
    "uninstall": (False, frozenset()),
    "objects": (False, frozenset()),
    # partitioned history (sql/0019)
    "rule_nats_history_partitions": (True, frozenset({W, A})),  # owner of the partitioned tables
    "rule_nats_history_route_id": (False, frozenset({W})),  # the sidecar's route ids
    "rule_nats_delivery_attempts_write": (False, frozenset()),  # INSTEAD OF trigger of the view
    "rule_nats_outcome_code": (False, frozenset({ANY})),  # pure
    "rule_nats_history_upgrade": (False, frozenset({A})),
    "history_move": (False, frozenset()),  # private: the upgrade's batches
    "rule_nats_count_successes": (True, frozenset({W})),  # recording = failures
    "owned": (False, frozenset()),
}


def _our_functions(conn: psycopg.Connection) -> list[tuple[str, str, bool, str, list[str] | None, list[str]]]:
    """(name, signature, security definer, owner, proconfig, roles with EXECUTE) of our functions."""
    return conn.execute(
        """
        SELECT p.proname, p.oid::regprocedure::text, p.prosecdef, p.proowner::regrole::text, p.proconfig,
               coalesce(ARRAY(SELECT CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE a.grantee::regrole::text END
                                FROM aclexplode(coalesce(p.proacl, acldefault('f', p.proowner))) a
                               WHERE a.privilege_type = 'EXECUTE' AND a.grantee <> p.proowner
                                 AND NOT coalesce((SELECT rolsuper FROM pg_roles WHERE oid = a.grantee), false)),
                        '{}')
          FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
         WHERE n.nspname IN ('public', 'rule_nats_private')
           AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.objid = p.oid AND d.deptype = 'e')
         ORDER BY 1, 2
        """
    ).fetchall()


def test_every_function_is_reviewed(database_url: str) -> None:
    with psycopg.connect(database_url) as conn:
        found = {row[0] for row in _our_functions(conn)}
    assert found - FUNCTIONS.keys() == set(), "new functions need a row in FUNCTIONS (and a review)"
    assert FUNCTIONS.keys() - found == set(), "functions listed here no longer exist"


def test_definer_functions_are_owned_by_a_non_superuser_and_pin_search_path(database_url: str) -> None:
    with psycopg.connect(database_url) as conn:
        role = conn.execute(
            "SELECT rolsuper, rolcanlogin, rolcreaterole, rolcreatedb, rolbypassrls, rolreplication "
            "FROM pg_roles WHERE rolname = 'rule_nats_definer'"
        ).fetchone()
        assert role == (False, False, False, False, False, False)
        members = conn.execute(
            "SELECT count(*) FROM pg_auth_members WHERE roleid = 'rule_nats_definer'::regrole"
        ).fetchone()
        assert members == (0,), "nobody may be a member of rule_nats_definer"
        rows = _our_functions(conn)
    definers = [r for r in rows if r[2]]
    assert definers
    for name, signature, _, owner, config, _ in definers:
        assert owner == "rule_nats_definer", signature
        assert config == ["search_path=pg_catalog, pg_temp"], signature
        assert FUNCTIONS[name][0], f"{signature} is SECURITY DEFINER but reviewed as invoker"
    for name, signature, secdef, *_ in rows:
        assert FUNCTIONS[name][0] == secdef, signature


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
def test_execute_is_granted_exactly_as_reviewed(database_url: str, name: str) -> None:
    with psycopg.connect(database_url) as conn:
        rows = [r for r in _our_functions(conn) if r[0] == name]
    for _, signature, _, _, _, grantees in rows:
        assert frozenset(grantees) == FUNCTIONS[name][1], signature
