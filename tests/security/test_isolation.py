"""Databases of one cluster that cannot hurt each other (issue 19, defects 9, 10 and 13).

Two databases of the session cluster carry the schema: the test's own (a copy of the template,
the cluster's first installation, which uses the public role names) and a second one migrated
from scratch. A login of one must not read the other's secrets, and enabling the failure log in
one must change nothing in the other. A cluster of its own that trusts every login (as the postgres
Docker image trusts 127.0.0.1) shows the failure log working without password authentication, and
`webhook-worker uninstall` leaving no role behind.
"""

from __future__ import annotations

import itertools
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from sidecar import cli, migrate
from tests.support.logins import Logins
from tests.support.stack import PostgresCluster, free_port
from tests.support.waits import wait_for, wait_scalar, wait_until

_counter = itertools.count(1)
KINDS = ("admin", "monitor", "worker", "publisher")
# One statement per role that works in the role's own database (a read of a secret or of a view,
# or the right to publish) and must be refused in the other database.
PROBES = {
    "admin": "SELECT nats_password FROM rule_nats_config LIMIT 1",
    "worker": "SELECT * FROM rule_webhook_secrets LIMIT 1",
    "monitor": "SELECT * FROM nats_failure_log_status",
    "publisher": "SELECT bool_or(has_function_privilege(p.oid, 'EXECUTE')) FROM pg_proc p "
    "WHERE p.proname = 'rule_nats_publish_on_commit'",
}


def role_for(conn: psycopg.Connection, kind: str) -> str:
    """The role to grant for `kind` in this database (the public name before rule_nats_role existed)."""
    if conn.execute("SELECT to_regproc('public.rule_nats_role') IS NOT NULL").fetchone() == (True,):
        row = conn.execute("SELECT rule_nats_role(%s)", (kind,)).fetchone()
        assert row is not None
        return str(row[0])
    return f"rule_nats_{kind}"


def url_for(url: str, user: str) -> str:
    return url.replace("postgresql://postgres@", f"postgresql://{user}@")


def new_database(cluster_url: str, name: str) -> str:
    with psycopg.connect(cluster_url, autocommit=True) as su:
        su.execute(sql.SQL("CREATE DATABASE {} TEMPLATE template0").format(sql.Identifier(name)))
    url = cluster_url.rsplit("/", 1)[0] + "/" + name
    migrate.migrate(url)
    return url


def drop_database(cluster_url: str, url: str) -> None:
    """Uninstall (when the schema has it: its own roles go too), then drop the database."""
    name = url.rsplit("/", 1)[1]
    with psycopg.connect(url, autocommit=True) as c:
        if c.execute("SELECT to_regproc('rule_nats_private.uninstall') IS NOT NULL").fetchone() == (True,):
            c.execute("SELECT rule_nats_private.uninstall()")
    with psycopg.connect(cluster_url, autocommit=True) as su:
        su.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture
def second_database(pg_cluster: PostgresCluster, database_url: str) -> Iterator[str]:
    """Another database of the same cluster with the schema, migrated from scratch."""
    url = new_database(pg_cluster.url(), f"iso_{next(_counter)}_{database_url.rsplit('/', 1)[1]}")
    yield url
    drop_database(pg_cluster.url(), url)


@pytest.fixture
def logins_per_database(database_url: str, second_database: str) -> Iterator[dict[tuple[str, str], str]]:
    """{(database 'a' or 'b', kind): login}: each login granted `kind` for its own database only."""
    made: dict[tuple[str, str], str] = {}
    suffix = database_url.rsplit("/", 1)[1]
    with psycopg.connect(database_url, autocommit=True) as su:
        for which, url in (("a", database_url), ("b", second_database)):
            with psycopg.connect(url, autocommit=True) as c:
                roles = {kind: role_for(c, kind) for kind in KINDS}
            for kind in KINDS:
                name = f"iso_{which}_{kind}_{suffix}"
                su.execute(
                    sql.SQL("CREATE ROLE {} LOGIN IN ROLE {}").format(
                        sql.Identifier(name), sql.Identifier(roles[kind])
                    )
                )
                made[(which, kind)] = name
        yield made
        su.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = ANY(%s)",
            (list(made.values()),),
        )
        for name in made.values():
            su.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(name)))


def test_a_login_of_one_database_reads_nothing_of_another(
    database_url: str, second_database: str, logins_per_database: dict[tuple[str, str], str]
) -> None:
    """Defect 10: a login granted rule_nats_worker for database A read database B's signing secrets."""
    urls = {"a": database_url, "b": second_database}
    for url in urls.values():
        with psycopg.connect(url, autocommit=True) as su:
            wid = su.execute(
                "INSERT INTO rule_webhooks (webhook_name, url, nats_subject) VALUES ('iso', 'https://example.invalid/h', "
                "'iso.h') "
                "RETURNING webhook_id"
            ).fetchone()
            assert wid is not None
            su.execute("SELECT rule_webhook_secret_create(%s)", (wid[0],))
    leaks = []
    for (home, kind), login in logins_per_database.items():
        for where, url in urls.items():
            with psycopg.connect(url_for(url, login), autocommit=True) as c:
                try:
                    row = c.execute(PROBES[kind]).fetchone()
                    reached = row is None or row[0] is not False
                except psycopg.errors.InsufficientPrivilege:
                    reached = False
            if where == home:
                assert reached, f"{login} ({kind} of {home}) cannot use its own database"
            elif reached:
                leaks.append(f"{kind} of {home} reached {where}")
    assert leaks == []


def test_enabling_the_failure_log_in_one_database_changes_nothing_in_another(
    database_url: str, second_database: str
) -> None:
    """Defect 10: enabling the failure log set a password on a role every database shared."""
    with psycopg.connect(database_url, autocommit=True) as a:
        assert a.execute("SELECT rule_nats_failure_log_check()").fetchone() == (None,)
    with psycopg.connect(second_database, autocommit=True) as b:
        b.execute("SELECT rule_nats_private.enable_failure_log('another password')")
        assert b.execute("SELECT rule_nats_failure_log_check()").fetchone() == (None,)
        # It records in B, despite the rollback.
        b.execute("UPDATE rule_nats_config SET nats_url = %s", (f"nats://127.0.0.1:{free_port()}",))
        with pytest.raises(psycopg.Error), b.transaction():
            b.execute("SELECT rule_nats_publish('iso.b', '{}', msg_id => 'lost-b')")
        assert b.execute(
            "SELECT count(*) FROM rule_nats_publish_history WHERE message_id = 'lost-b' AND NOT success"
        ).fetchone() == (1,)
    # A fresh session of A (its failure-log connection is opened anew) still gets in.
    with psycopg.connect(database_url, autocommit=True) as a:
        assert a.execute("SELECT rule_nats_failure_log_check()").fetchone() == (None,)


def _sessions(conn: psycopg.Connection) -> int:
    """Sessions ever established to this database (a session is counted once it has ended)."""
    conn.execute("SELECT pg_stat_clear_snapshot()")
    row = conn.execute("SELECT sessions FROM pg_stat_database WHERE datname = current_database()").fetchone()
    assert row is not None
    return int(row[0])


def test_the_failure_log_check_reuses_its_connection_and_its_role_has_a_limit(database_url: str) -> None:
    """Defect 9: rule_nats_failure_log_check() opened a backend per call (200 in 4.6 s), and the
    failure log's role had no connection limit. A successful check answers for the next 5 s (the
    connection it opened is closed at once: review F4), so 30 checks open one backend."""
    with psycopg.connect(database_url, autocommit=True) as su:
        monitor = f"iso_mon_{database_url.rsplit('/', 1)[1]}"
        su.execute(
            sql.SQL("CREATE ROLE {} LOGIN IN ROLE {}").format(
                sql.Identifier(monitor), sql.Identifier(role_for(su, "monitor"))
            )
        )
        writer = role_for(su, "failure_writer")
        try:
            # Nothing answers for the first check: it connects.
            su.execute("SELECT setval('rule_nats_private.failure_log_ok_at', 0)")
            before = _sessions(su)
            with psycopg.connect(url_for(database_url, monitor), autocommit=True) as c:
                for _ in range(30):
                    assert c.execute("SELECT rule_nats_failure_log_check()").fetchone() == (None,)
                # The caller holds no connection of the role once the call returned.
                assert su.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE usename = %s", (writer,)
                ).fetchone() == (0,) or _writer_gone(su, writer)
                assert c.execute("SELECT status FROM nats_failure_log_status").fetchone() == ("ok",)
            # Every session involved has ended (and reported itself to the statistics).
            wait_scalar(
                su,
                "SELECT count(*) FROM pg_stat_activity WHERE usename = ANY(%s)",
                ([monitor, writer],),
                until=lambda n: n == 0,
                timeout=10,
            )
            # A backend's statistics arrive as it exits. A sentinel session, opened and closed after
            # all of them: once it is counted, so is any session the checks opened.
            psycopg.connect(database_url).close()
            wait_for(lambda: _sessions(su), lambda n: n >= before + 3, "the sentinel session counted", 10)
            opened = _sessions(su) - before - 2  # minus the monitor's and the sentinel's
            assert opened <= 1, f"{opened} sessions opened for 30 checks"
        finally:
            su.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(monitor)))
        limit = su.execute("SELECT rolconnlimit FROM pg_roles WHERE rolname = %s", (writer,)).fetchone()
        assert limit is not None and 1 <= limit[0] <= 1000, limit


def _writer_gone(su: psycopg.Connection, writer: str) -> bool:
    """The failure-writer's backend exits on its own time after the disconnect."""
    return wait_until(
        lambda: (
            su.execute("SELECT count(*) FROM pg_stat_activity WHERE usename = %s", (writer,)).fetchone()
            == (0,)
        ),
        timeout=3,
    )


def test_a_monitor_checking_from_many_sessions_leaves_the_failure_log_its_connections(
    logins: Logins,
) -> None:
    """Review F4: the check kept a failure-writer connection in the caller's session; a read-only
    monitor with as many sessions as the role's connection limit took them all, and failed
    publishes went unrecorded (the publisher was then told the log "is not enabled")."""
    su = logins.su
    writer = role_for(su, "failure_writer")
    row = su.execute("SELECT rolconnlimit FROM pg_roles WHERE rolname = %s", (writer,)).fetchone()
    assert row is not None
    limit = 3
    su.execute(
        sql.SQL("ALTER ROLE {} CONNECTION LIMIT {}").format(sql.Identifier(writer), sql.Literal(limit))
    )
    sessions = []
    try:
        for _ in range(limit):
            # Nothing answers for a check: each one connects.
            su.execute("SELECT setval('rule_nats_private.failure_log_ok_at', 0)")
            c = logins.connect("monitor")
            sessions.append(c)
            assert c.execute("SELECT rule_nats_failure_log_check()").fetchone() == (None,)
        _writer_gone(su, writer)
        su.execute("UPDATE rule_nats_config SET nats_url = %s", (f"nats://127.0.0.1:{free_port()}",))
        with logins.connect("publisher") as p, pytest.raises(psycopg.Error), p.transaction():
            p.execute("SELECT rule_nats_publish('f4.a', '{}', msg_id => 'f4-lost')")
        assert su.execute(
            "SELECT count(*) FROM rule_nats_publish_history WHERE message_id = 'f4-lost' AND NOT success"
        ).fetchone() == (1,)
    finally:
        for c in sessions:
            c.close()
        su.execute(
            sql.SQL("ALTER ROLE {} CONNECTION LIMIT {}").format(sql.Identifier(writer), sql.Literal(row[0]))
        )


# ---------------------------------------------------------------------------------------------
# A cluster that trusts every login.
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trust_cluster() -> Iterator[PostgresCluster]:
    cluster = PostgresCluster(Path(tempfile.mkdtemp(prefix="wwtest-trust-")), trust_all=True)
    cluster.start()
    yield cluster
    cluster.cleanup()


def test_the_failure_log_works_on_a_trust_configured_cluster(trust_cluster: PostgresCluster) -> None:
    """Defect 10 (and issue 21's defect 1, the postgres Docker image): dblink lets a non-superuser
    connect only with a password the server asked for, so where the server asks none, failed SQL
    publishes went unrecorded."""
    url = new_database(trust_cluster.url(), "trusting")
    try:
        with psycopg.connect(url, autocommit=True) as c:
            c.execute("SELECT rule_nats_private.enable_failure_log('unused on a trust cluster')")
            c.execute("UPDATE rule_nats_config SET nats_url = %s", (f"nats://127.0.0.1:{free_port()}",))
            publisher = "trusting_publisher"
            c.execute(
                sql.SQL("CREATE ROLE {} LOGIN IN ROLE {}").format(
                    sql.Identifier(publisher), sql.Identifier(role_for(c, "publisher"))
                )
            )
            with psycopg.connect(url_for(url, publisher), autocommit=True) as p:
                with pytest.raises(psycopg.Error), p.transaction():
                    p.execute("SELECT rule_nats_publish('trust.a', '{}', msg_id => 'lost-on-trust')")
                # The connection opened for that write is closed again: an application session
                # that failed once holds none of the role's few connections.
                writers = "SELECT count(*) FROM pg_stat_activity WHERE usename = %s"
                # (the remote backend exits on its own time)
                wait_scalar(c, writers, (role_for(c, "failure_writer"),), until=lambda n: n == 0, timeout=3)
            row = c.execute(
                "SELECT success, error_message FROM rule_nats_publish_history WHERE message_id = 'lost-on-trust'"
            ).fetchone()
            assert row is not None and row[0] is False, row
            status = c.execute("SELECT status, failures FROM nats_failure_log_status").fetchone()
            assert status == ("ok", 0), status
            c.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(publisher)))
    finally:
        # Dropped WITHOUT uninstalling: the roles stay behind, as they did (defect 13).
        with psycopg.connect(trust_cluster.url(), autocommit=True) as su:
            su.execute("DROP DATABASE trusting WITH (FORCE)")


def _ours(url: str) -> list[str]:
    with psycopg.connect(url, autocommit=True) as c:
        rows = c.execute(
            "SELECT relname FROM pg_class WHERE relname LIKE 'rule\\_nats%' OR relname LIKE 'nats\\_%' "
            "UNION ALL SELECT proname FROM pg_proc WHERE proname LIKE 'rule\\_nats%' OR proname LIKE 'rule\\_webhook%' "
            "UNION ALL SELECT nspname FROM pg_namespace WHERE nspname LIKE 'rule\\_nats%'"
        ).fetchall()
    return [str(r[0]) for r in rows]


def _roles(cluster: PostgresCluster) -> set[str]:
    with psycopg.connect(cluster.url(), autocommit=True) as c:
        return {
            str(r[0]) for r in c.execute("SELECT rolname FROM pg_roles WHERE rolname LIKE 'rule\\_nats%'")
        }


def test_uninstall_removes_the_schema_and_the_roles_no_other_database_uses(
    trust_cluster: PostgresCluster, capsys: pytest.CaptureFixture[str]
) -> None:
    """Defect 13: trying the tool left the cluster-wide roles behind after DROP DATABASE, and there
    was no documented way to uninstall."""
    first = new_database(trust_cluster.url(), "first")
    second = new_database(trust_cluster.url(), "second")
    with psycopg.connect(first, autocommit=True) as c:
        c.execute("CREATE TABLE orders (id int PRIMARY KEY)")
        c.execute(
            "CREATE TRIGGER orders_nats AFTER INSERT ON orders FOR EACH ROW "
            "EXECUTE FUNCTION rule_nats_table_trigger('orders.created')"
        )
        c.execute("CREATE ROLE app_first LOGIN")
        c.execute(sql.SQL("GRANT {} TO app_first").format(sql.Identifier(role_for(c, "publisher"))))
        first_roles = {role_for(c, k) for k in (*KINDS, "failure_writer")}
    with psycopg.connect(second, autocommit=True) as c:
        second_worker = role_for(c, "worker")
    assert cli.main(["uninstall", "--database-url", first]) == 2  # nothing without --yes
    assert cli.main(["uninstall", "--database-url", first, "--yes"]) == 0
    print(capsys.readouterr().out)
    assert _ours(first) == []
    with psycopg.connect(first, autocommit=True) as c:
        assert c.execute("SELECT count(*) FROM pg_trigger WHERE tgname = 'orders_nats'").fetchone() == (0,)
        assert c.execute("SELECT count(*) FROM orders").fetchone() == (0,)  # the application's table stays
    # The second database still works, with its worker role.
    assert second_worker in _roles(trust_cluster)
    with psycopg.connect(second, autocommit=True) as c:
        c.execute(sql.SQL("SET ROLE {}").format(sql.Identifier(second_worker)))
        c.execute("SELECT * FROM rule_webhook_secrets")
    # The first database's own roles are gone unless the second uses them.
    assert not (first_roles - {f"rule_nats_{k}" for k in (*KINDS, "failure_writer")}) & _roles(trust_cluster)

    assert cli.main(["uninstall", "--database-url", second, "--yes"]) == 0
    assert _ours(second) == []
    # Nothing of ours is left in the cluster, not even what the database dropped without
    # uninstalling (test_the_failure_log_works_on_a_trust_configured_cluster) left behind.
    assert _roles(trust_cluster) == set()
    with psycopg.connect(trust_cluster.url(), autocommit=True) as su:
        su.execute("DROP ROLE app_first")
        su.execute("DROP DATABASE first WITH (FORCE)")
        su.execute("DROP DATABASE second WITH (FORCE)")


def test_migrate_moves_what_a_later_migration_grants_to_the_public_names(
    pg_cluster: PostgresCluster, database_url: str, tmp_path: Path
) -> None:
    """A migration written later grants to rule_nats_worker, as all of them did: in a database with
    roles of its own, `webhook-worker migrate` moves that grant too (rule_nats_private.isolate)."""
    folder = tmp_path / "sql"
    folder.mkdir()
    shipped = sorted(migrate.sql_dir().glob("[0-9][0-9][0-9][0-9]_*.sql"))
    for f in shipped:
        (folder / f.name).write_text(f.read_text())
    later = len(shipped) + 1
    (folder / f"{later:04d}_later.sql").write_text(
        "CREATE TABLE rule_nats_later (x int);\n"
        "GRANT SELECT ON rule_nats_later TO rule_nats_worker;\n"
        f"INSERT INTO rule_nats_schema_migrations (version, name) VALUES ({later}, 'later');\n"
    )
    name = f"iso_later_{database_url.rsplit('/', 1)[1]}"
    with psycopg.connect(pg_cluster.url(), autocommit=True) as su:
        su.execute(sql.SQL("CREATE DATABASE {} TEMPLATE template0").format(sql.Identifier(name)))
    url = pg_cluster.url(name)
    try:
        migrate.migrate(url, folder)
        with psycopg.connect(url, autocommit=True) as c:
            own = role_for(c, "worker")
            assert own != "rule_nats_worker"  # the template is the cluster's first installation
            check = "SELECT has_table_privilege(%s, 'rule_nats_later', 'SELECT')"
            assert c.execute(check, (own,)).fetchone() == (True,)
            assert c.execute(check, ("rule_nats_worker",)).fetchone() == (False,)
            # Nothing in this database is granted to a public name any more.
            left = c.execute(
                "SELECT count(*) FROM pg_shdepend s WHERE s.dbid = (SELECT oid FROM pg_database "
                "WHERE datname = current_database()) AND s.refobjid IN (SELECT oid FROM pg_roles WHERE rolname IN "
                "('rule_nats_admin', 'rule_nats_monitor', 'rule_nats_worker', 'rule_nats_publisher', "
                "'rule_nats_failure_writer'))"
            ).fetchone()
            assert left == (0,)
    finally:
        drop_database(pg_cluster.url(), url)


# ---------------------------------------------------------------------------------------------
# Findings of the security review of 0014-0017.
# ---------------------------------------------------------------------------------------------


def test_recent_failure_payloads_follow_this_databases_own_admin(
    database_url: str, second_database: str
) -> None:
    """F1: nats_recent_failures showed payloads to members of rule_nats_admin, the first
    installation's admin, in every database: another database's admin read them, this one's got NULL."""
    suffix = database_url.rsplit("/", 1)[1]
    own_admin, other_admin = f"rf_own_{suffix}", f"rf_other_{suffix}"
    with psycopg.connect(second_database, autocommit=True) as b:
        b.execute(
            "INSERT INTO rule_nats_publish_history (subject, payload, success, error_message, triggered_by) "
            "VALUES ('f1.s', '{\"secret\": 1}', false, 'x', 'sql')"
        )
        b_admin = role_for(b, "admin")
        assert b_admin != "rule_nats_admin"
        b.execute(
            sql.SQL("CREATE ROLE {} LOGIN IN ROLE {}").format(
                sql.Identifier(own_admin), sql.Identifier(b_admin)
            )
        )
        b.execute(sql.SQL("CREATE ROLE {} LOGIN IN ROLE rule_nats_admin").format(sql.Identifier(other_admin)))
        try:
            seen = {}
            for login in (own_admin, other_admin):
                with psycopg.connect(url_for(second_database, login), autocommit=True) as c:
                    try:
                        seen[login] = c.execute(
                            "SELECT payload FROM nats_recent_failures WHERE subject = 'f1.s'"
                        ).fetchall()
                    except psycopg.errors.InsufficientPrivilege:
                        seen[login] = "refused"
            assert seen[own_admin] == [({"secret": 1},)], seen
            assert seen[other_admin] in ("refused", [(None,)]), seen
        finally:
            for login in (own_admin, other_admin):
                b.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(login)))


_ROLE_CHECK = re.compile(
    r"(pg_has_role|is_member_of|rolname\s*=|rolname\s+in)[^;]{0,200}'rule_nats_(admin|monitor|worker|publisher)'",
    re.IGNORECASE | re.DOTALL,
)


def test_no_authorization_by_a_literal_public_role_name(database_url: str) -> None:
    """F1: a view or function deciding who sees what by the literal name rule_nats_admin (or
    _monitor, _worker, _publisher) is wrong in every database with roles of its own: it must ask
    rule_nats_role(kind) or a privilege that follows the grants isolate() moves."""
    with psycopg.connect(database_url, autocommit=True) as c:
        rows = c.execute(
            "SELECT p.oid::regprocedure::text, p.prosrc FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace "
            "WHERE n.nspname IN ('public', 'rule_nats_private') AND p.proname NOT IN ('uninstall', 'isolate') "
            "UNION ALL SELECT c.oid::regclass::text, pg_get_viewdef(c.oid) FROM pg_class c "
            "WHERE c.relkind IN ('v', 'm') AND c.relnamespace IN ('public'::regnamespace)"
        ).fetchall()
    bad = [name for name, body in rows if body and _ROLE_CHECK.search(body)]
    assert bad == []


def test_a_failing_later_migration_leaves_no_grant_on_the_public_names(
    pg_cluster: PostgresCluster, database_url: str, tmp_path: Path
) -> None:
    """Review F6: migrate moved grants only after every pending migration succeeded; when a later
    one failed, what the earlier ones granted to rule_nats_worker stayed on the public name in a
    database with roles of its own (another installation's workers read it)."""
    folder = tmp_path / "sql"
    folder.mkdir()
    shipped = sorted(migrate.sql_dir().glob("[0-9][0-9][0-9][0-9]_*.sql"))
    for f in shipped:
        (folder / f.name).write_text(f.read_text())
    later = len(shipped) + 1
    (folder / f"{later:04d}_later.sql").write_text(
        "CREATE TABLE rule_nats_later (x int);\n"
        "GRANT SELECT ON rule_nats_later TO rule_nats_worker;\n"
        f"INSERT INTO rule_nats_schema_migrations (version, name) VALUES ({later}, 'later');\n"
    )
    (folder / f"{later + 1:04d}_broken.sql").write_text("SELECT 1 / 0;\n")
    name = f"iso_broken_{database_url.rsplit('/', 1)[1]}"
    with psycopg.connect(pg_cluster.url(), autocommit=True) as su:
        su.execute(sql.SQL("CREATE DATABASE {} TEMPLATE template0").format(sql.Identifier(name)))
    url = pg_cluster.url(name)
    try:
        with pytest.raises(migrate.MigrationError, match="division by zero"):
            migrate.migrate(url, folder)
        with psycopg.connect(url, autocommit=True) as c:
            own = role_for(c, "worker")
            assert own != "rule_nats_worker"
            check = "SELECT has_table_privilege(%s, 'rule_nats_later', 'SELECT')"
            assert c.execute(check, ("rule_nats_worker",)).fetchone() == (False,)
            assert c.execute(check, (own,)).fetchone() == (True,)
    finally:
        drop_database(pg_cluster.url(), url)


def test_uninstall_leaves_the_applications_objects_and_refuses_to_cascade_into_them(
    trust_cluster: PostgresCluster,
) -> None:
    """Review F7: uninstall dropped, with CASCADE, everything in public named nats_%, rule_nats%,
    rule_webhook% (the application's nats_import_log, its nats_app_helper()) and, through CASCADE,
    the CHECK constraints, defaults and views of application tables that used our helpers."""
    url = new_database(trust_cluster.url(), "appobjects")
    try:
        with psycopg.connect(url, autocommit=True) as c:
            c.execute("CREATE TABLE nats_import_log (id int PRIMARY KEY, note text)")
            c.execute("INSERT INTO nats_import_log VALUES (1, 'kept')")
            c.execute("CREATE FUNCTION nats_app_helper() RETURNS int LANGUAGE sql AS 'SELECT 42'")
            c.execute(
                "CREATE TABLE app_events (id int PRIMARY KEY, subject text "
                "CONSTRAINT app_subject CHECK (rule_nats_valid_subject(subject)))"
            )
            c.execute("CREATE VIEW app_hooks AS SELECT webhook_id FROM nats_webhooks")
            with pytest.raises(psycopg.errors.DependentObjectsStillExist) as refused:
                c.execute("SELECT rule_nats_private.uninstall()")
            message = str(refused.value)
            assert "app_subject" in message and "app_hooks" in message, message
            assert (
                refused.value.diag.message_hint and "nothing was dropped" in refused.value.diag.message_hint
            )
            # Nothing was dropped.
            assert c.execute("SELECT count(*) FROM rule_webhooks").fetchone() == (0,)
            c.execute("ALTER TABLE app_events DROP CONSTRAINT app_subject")
            c.execute("DROP VIEW app_hooks")
            c.execute("SELECT rule_nats_private.uninstall()")
            assert _ours(url) == ["nats_import_log", "nats_import_log_pkey"] or sorted(_ours(url)) == [
                "nats_import_log",
                "nats_import_log_pkey",
            ]
            assert c.execute("SELECT note FROM nats_import_log").fetchone() == ("kept",)
            assert c.execute("SELECT nats_app_helper()").fetchone() == (42,)
            assert c.execute("SELECT count(*) FROM app_events").fetchone() == (0,)
    finally:
        with psycopg.connect(trust_cluster.url(), autocommit=True) as su:
            su.execute("DROP DATABASE appobjects WITH (FORCE)")


def test_uninstall_knows_every_object_the_migrations_create(database_url: str) -> None:
    """Review F7: uninstall drops by name (rule_nats_private.objects); a migration that adds an
    object to schema public must add its name there, or uninstall would leave it behind."""
    with psycopg.connect(database_url, autocommit=True) as c:
        present = {
            (str(kind), str(name))
            for kind, name in c.execute(
                "SELECT 'relation', relname FROM pg_class WHERE relnamespace = 'public'::regnamespace "
                "AND relkind IN ('r', 'v', 'm', 'p', 'S', 'f') "
                "UNION SELECT 'function', proname FROM pg_proc WHERE pronamespace = 'public'::regnamespace"
            ).fetchall()
        }
        listed = {
            (kind, str(name))
            for kind in ("relation", "function")
            for (name,) in c.execute("SELECT unnest(rule_nats_private.objects(%s))", (kind,)).fetchall()
        }
    assert present - listed == set()
    assert listed - present == set()


def test_no_function_of_the_private_schema_is_executable_by_public(database_url: str) -> None:
    """Review hardening note: dblink's functions (dblink_connect_u among them) were executable by
    PUBLIC; only the schema's USAGE stopped a caller."""
    with psycopg.connect(database_url, autocommit=True) as c:
        rows = c.execute(
            "SELECT p.oid::regprocedure::text FROM pg_proc p, aclexplode(coalesce(p.proacl, acldefault('f', p.proowner))) a "
            "WHERE p.pronamespace = 'rule_nats_private'::regnamespace AND a.grantee = 0 AND a.privilege_type = 'EXECUTE'"
        ).fetchall()
    assert rows == []


def test_a_login_cannot_force_a_database_off_the_public_role_names(tmp_path: Path) -> None:
    """Review F5: the upgrade to 0017 gave a database roles of its own (cutting its logins off)
    whenever pg_shdepend showed the public roles holding anything in another database: any login
    could arrange that by granting SELECT on its own temporary table to rule_nats_worker."""
    cluster = PostgresCluster(Path(tempfile.mkdtemp(prefix="wwtest-f5-")), trust_all=True)
    cluster.start()
    try:
        folder = tmp_path / "sql"
        folder.mkdir()
        for f in sorted(migrate.sql_dir().glob("[0-9][0-9][0-9][0-9]_*.sql")):
            if int(f.name[:4]) < 17:
                (folder / f.name).write_text(f.read_text())
        with psycopg.connect(cluster.url(), autocommit=True) as su:
            su.execute("CREATE DATABASE victim TEMPLATE template0")
            su.execute("CREATE ROLE mallory LOGIN")
            su.execute("CREATE ROLE victim_app LOGIN")
        url = cluster.url("victim")
        migrate.migrate(url, folder)  # an installation of 0016, the cluster's only one
        with psycopg.connect(cluster.url(), autocommit=True) as su:
            # Its own login: an upgrade keeps it (the public roles' members are this database's).
            su.execute("GRANT rule_nats_worker TO victim_app")
        with psycopg.connect(url_for(cluster.url(), "mallory"), autocommit=True) as m:
            m.execute("CREATE TEMP TABLE bait (x int)")
            m.execute("GRANT SELECT ON bait TO rule_nats_worker")
            migrate.migrate(url)  # the upgrade to 0017 while mallory's grant exists
        with psycopg.connect(url, autocommit=True) as c:
            assert c.execute("SELECT role_suffix FROM rule_nats_installation_roles").fetchone() == (None,)
            assert role_for(c, "worker") == "rule_nats_worker"
        with psycopg.connect(url_for(url, "victim_app"), autocommit=True) as c:
            c.execute("SELECT * FROM rule_webhook_secrets")
    finally:
        cluster.cleanup()


def test_the_logins_of_a_dropped_installation_get_nothing_in_the_next_one() -> None:
    """Review F2: after the first installation's database was dropped without uninstalling, the
    next installation kept the public names, and the old database's logins (members of
    rule_nats_admin) became admins of the new one."""
    cluster = PostgresCluster(Path(tempfile.mkdtemp(prefix="wwtest-f2-")), trust_all=True)
    cluster.start()
    try:
        new_database(cluster.url(), "gone")
        with psycopg.connect(cluster.url(), autocommit=True) as su:
            su.execute("CREATE ROLE old_admin LOGIN IN ROLE rule_nats_admin")
            su.execute("DROP DATABASE gone WITH (FORCE)")  # without uninstalling
        url = new_database(cluster.url(), "next")
        with (
            psycopg.connect(url_for(url, "old_admin"), autocommit=True) as c,
            pytest.raises(psycopg.errors.InsufficientPrivilege),
        ):
            c.execute("SELECT nats_password FROM rule_nats_config")
        with psycopg.connect(url, autocommit=True) as c:
            assert c.execute(
                "SELECT role_suffix IS NOT NULL FROM rule_nats_installation_roles"
            ).fetchone() == (True,)
    finally:
        cluster.cleanup()
