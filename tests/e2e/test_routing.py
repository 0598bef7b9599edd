"""Routing by subject (issue 18): a message that names no endpoint reaches the webhooks registered on
its subject, each on its own; none registered there: a dead letter that names the subject.

Failed on main: the README's own publish examples ended as missing_webhook_url dead letters.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable

import psycopg

from tests.e2e.conftest import Sidecar, wait_until
from tests.e2e.test_delivery import configure, wait_ready
from tests.support.receiver import Receiver, Request, Response


def _bodies(receiver: Receiver, path: str) -> list[dict[str, object]]:
    return [json.loads(r.body) for r in receiver.snapshot() if r.path == path]


def test_the_readme_publishes_reach_the_webhook_registered_on_their_subject(
    nats_db: psycopg.Connection, receiver: Receiver, sidecar_factory: Callable[..., Sidecar]
) -> None:
    db = nats_db
    # Streams and subjects of its own: the session's nats-server keeps other tests' streams.
    configure(db, "ROUTE1", "rt1")
    db.execute(
        "INSERT INTO rule_webhooks (webhook_name, url, nats_subject) VALUES ('orders', %s, 'rt1.orders')",
        (receiver.url + "/orders",),
    )
    sidecar_factory()
    wait_ready(db)
    db.execute("""SELECT rule_nats_publish('rt1.orders', '{"order_id": 42}', msg_id => 'order-42')""")
    with db.transaction():
        db.execute("""SELECT rule_nats_publish_on_commit('rt1.orders', '{"order_id": 43}')""")
    db.execute("CREATE TABLE orders (id int PRIMARY KEY, status text)")
    db.execute(
        "CREATE TRIGGER orders_to_nats AFTER INSERT ON orders "
        "FOR EACH ROW EXECUTE FUNCTION rule_nats_table_trigger('rt1.orders')"
    )
    db.execute("INSERT INTO orders VALUES (44, 'new')")
    got = receiver.wait_for(3, timeout=20)
    assert len(got) == 3, [r.body for r in got]
    bodies = _bodies(receiver, "/orders")
    assert {"order_id": 42} in bodies and {"order_id": 43} in bodies
    assert any("44" in json.dumps(b) for b in bodies)
    ids = sorted(r.headers["webhook-id"] for r in got)
    assert "order-42@1" in ids and all(i.endswith("@1") for i in ids)
    assert wait_until(
        lambda: (
            db.execute(
                "SELECT count(*) FROM rule_nats_delivery_attempts WHERE outcome = 'delivered' AND webhook_id = 1"
            ).fetchone()
            == (3,)
        )
    )
    assert db.execute(
        "SELECT message_id FROM rule_nats_delivery_attempts WHERE message_id = 'order-42@1'"
    ).fetchone()
    assert db.execute("SELECT count(*) FROM rule_nats_dead_letters").fetchone() == (0,)


def test_two_webhooks_on_one_subject_each_get_it_with_their_own_rows_retries_and_signature(
    nats_db: psycopg.Connection, sidecar_factory: Callable[..., Sidecar]
) -> None:
    db = nats_db
    failed_once = threading.Event()

    def respond(req: Request) -> Response:
        if req.path == "/crm" and not failed_once.is_set():
            failed_once.set()
            return Response(status=503)
        return Response()

    receiver = Receiver(respond).start()
    try:
        configure(db, "ROUTE2", "rt2", retry_initial_seconds=0.2)
        for name in ("slack", "crm"):
            db.execute(
                "INSERT INTO rule_webhooks (webhook_name, url, nats_subject) VALUES (%s, %s, 'rt2.user.registered')",
                (name, f"{receiver.url}/{name}"),
            )
        secret = db.execute("SELECT rule_webhook_secret_create(2)").fetchone()
        assert secret is not None
        sidecar_factory()
        wait_ready(db)
        db.execute("""SELECT rule_nats_publish('rt2.user.registered', '{"user_id": 7}', msg_id => 'u7')""")
        assert wait_until(
            lambda: sorted(r.path for r in receiver.snapshot()) == ["/crm", "/crm", "/slack"], timeout=20
        ), [r.path for r in receiver.snapshot()]
        by_path = {r.path: r for r in receiver.snapshot()}
        assert by_path["/slack"].headers["webhook-id"] == "u7@1"
        assert by_path["/crm"].headers["webhook-id"] == "u7@2"
        assert "webhook-signature" not in by_path["/slack"].headers
        assert by_path["/crm"].headers["webhook-signature"].startswith("v1,")
        assert json.loads(by_path["/slack"].body) == {"user_id": 7} == json.loads(by_path["/crm"].body)
        assert wait_until(
            lambda: (
                db.execute(
                    "SELECT message_id, webhook_id, attempt, outcome FROM rule_nats_delivery_attempts ORDER BY attempt_id"
                ).fetchall()
                == [("u7@1", 1, 1, "delivered"), ("u7@2", 2, 1, "retry"), ("u7@2", 2, 2, "delivered")]
                or db.execute(
                    "SELECT message_id, webhook_id, attempt, outcome FROM rule_nats_delivery_attempts ORDER BY attempt_id"
                ).fetchall()
                == [("u7@2", 2, 1, "retry"), ("u7@1", 1, 1, "delivered"), ("u7@2", 2, 2, "delivered")]
            ),
            timeout=20,
        ), db.execute(
            "SELECT message_id, webhook_id, attempt, outcome FROM rule_nats_delivery_attempts"
        ).fetchall()
        # The NATS message was acknowledged once both outcomes were recorded: nothing is pending.
        assert wait_until(
            lambda: db.execute("SELECT count(*) FROM rule_nats_retries").fetchone() == (0,), timeout=10
        )
        # Nothing was sent twice: one copy each (plus crm's retry).
        assert len(receiver.snapshot()) == 3
    finally:
        receiver.stop()


def test_no_webhook_on_the_subject_is_a_dead_letter_that_names_it(
    nats_db: psycopg.Connection, receiver: Receiver, sidecar_factory: Callable[..., Sidecar]
) -> None:
    db = nats_db
    configure(db, "ROUTE3", "rt3")
    db.execute(
        "INSERT INTO rule_webhooks (webhook_name, url, nats_subject, enabled) "
        "VALUES ('off', %s, 'rt3.nobody', false)",
        (receiver.url + "/off",),
    )
    sidecar_factory()
    wait_ready(db)
    db.execute("""SELECT rule_nats_publish('rt3.nobody', '{"x": 1}', msg_id => 'lost-1')""")
    assert wait_until(
        lambda: db.execute("SELECT count(*) FROM rule_nats_dead_letters").fetchone() == (1,), timeout=20
    )
    row = db.execute("SELECT message_id, reason, error FROM rule_nats_dead_letters").fetchone()
    assert row is not None
    assert row[0] == "lost-1" and row[1] == "missing_webhook_url"
    assert "'rt3.nobody'" in row[2], row
    assert receiver.snapshot() == []


def test_a_webhook_registered_just_before_the_publish_gets_its_subject_s_message(
    database_url: str,
    nats_db: psycopg.Connection,
    receiver: Receiver,
    sidecar_factory: Callable[..., Sidecar],
) -> None:
    """Issue 19: routing by subject decided from the registry in memory, so a webhook registered
    within the reload's coalescing (0.5 s) got a missing_webhook_url dead letter instead of the
    message. The race is made certain: the reload is held back by a lock on a table it reads."""
    db = nats_db
    configure(db, "ROUTE4", "rt4")
    sidecar_factory()
    wait_ready(db)
    locker = psycopg.connect(database_url)
    locker.execute("LOCK TABLE rule_webhook_secrets IN ACCESS EXCLUSIVE MODE")  # the reload reads it
    release = threading.Timer(3.0, locker.rollback)
    release.start()
    try:
        db.execute(
            "INSERT INTO rule_webhooks (webhook_name, url, nats_subject) VALUES ('late', %s, 'rt4.new')",
            (receiver.url + "/late",),
        )
        db.execute("""SELECT rule_nats_publish('rt4.new', '{"n": 1}', msg_id => 'late-1')""")
    finally:
        release.join()
        locker.close()
    assert wait_until(
        lambda: db.execute("SELECT count(*) FROM rule_nats_delivery_attempts").fetchone() == (1,), timeout=20
    )
    assert db.execute("SELECT message_id, outcome FROM rule_nats_delivery_attempts").fetchall() == [
        ("late-1@1", "delivered")
    ]
    assert db.execute("SELECT count(*) FROM rule_nats_dead_letters").fetchone() == (0,)
    assert [r.path for r in receiver.snapshot()] == ["/late"]
