"""Safe delivery end to end: signatures and rotation, SSRF policy, bad input, limits, circuit breaker.

The sidecar runs as a subprocess logged in as rule_nats_worker; every receiver is on loopback.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import psycopg
import pytest
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

from tests.support.publish import publish_raw
from tests.support.receiver import Receiver, Request, Response
from tests.support.registry import add_webhook, configure, envelope, scalar, wait_ready
from tests.support.sidecar import Sidecar, applied
from tests.support.stack import NatsServer
from tests.support.waits import wait_for, wait_until


@pytest.fixture
def db(nats_db: psycopg.Connection) -> psycopg.Connection:
    return nats_db


def dead_letters(db: psycopg.Connection) -> list[tuple[str, str]]:
    return db.execute("SELECT reason, error FROM rule_nats_dead_letters ORDER BY dead_letter_id").fetchall()


def test_signatures_verify_with_the_reference_library_and_rotate_without_downtime(
    db: psycopg.Connection,
    receiver: Receiver,
    sidecar_factory: Callable[..., Sidecar],
    nats_server: NatsServer,
) -> None:
    configure(db, "SIG", "sig", retry_initial_seconds=0.2)
    hook = add_webhook(db, "signed", receiver.url + "/s", "sig.a")
    old = scalar(db, "SELECT rule_webhook_secret_create(%s)", (hook,))
    fail_first = {"retry-me"}

    def respond(req: Request) -> Response:
        if req.headers.get("webhook-id") in fail_first:
            fail_first.discard(req.headers["webhook-id"])
            return Response(status=500)
        return Response()

    receiver.responder = respond
    sidecar = sidecar_factory()
    wait_ready(db)
    db.execute("SELECT rule_webhook_publish_nats(%s, '{\"n\": 1, \"s\": \"it''s\"}', 'evt-1')", (hook,))
    (first,) = receiver.wait_for(1, timeout=20)
    assert first.headers["webhook-id"] == "evt-1"
    Webhook(old).verify(first.body, first.headers)

    # A retried message keeps its webhook-id; each attempt is signed with its own timestamp.
    db.execute("SELECT rule_webhook_publish_nats(%s, '{\"n\": 2}', 'retry-me')", (hook,))
    got = receiver.wait_for(3, timeout=20)
    retried = [r for r in got if r.headers.get("webhook-id") == "retry-me"]
    assert len(retried) == 2
    for r in retried:
        Webhook(old).verify(r.body, r.headers)

    # Rotation: both secrets sign until the old one expires.
    def publish_one() -> Request:
        """One more event, once the sidecar applied the change; its delivery."""
        sent = len(receiver.snapshot())
        db.execute("SELECT rule_webhook_publish_nats(%s, '{\"n\": 3}')", (hook,))
        return receiver.wait_for(sent + 1, timeout=15)[sent]

    with applied(sidecar):
        new = scalar(db, "SELECT rule_webhook_secret_rotate(%s, interval '1 hour')", (hook,))
    assert new != old and new.startswith("whsec_")
    last = publish_one()
    assert len(last.headers.get("webhook-signature", "").split(" ")) == 2
    Webhook(old).verify(last.body, last.headers)
    Webhook(new).verify(last.body, last.headers)

    # Revoking the old secret: only the new one signs.
    old_id = db.execute(
        "SELECT secret_id FROM rule_webhook_secrets WHERE webhook_id = %s ORDER BY secret_id LIMIT 1", (hook,)
    ).fetchone()[0]  # type: ignore[index]
    with applied(sidecar):
        assert scalar(db, "SELECT rule_webhook_secret_revoke(%s, %s)", (hook, old_id)) == 1
    last = publish_one()
    assert len(last.headers.get("webhook-signature", "").split(" ")) == 1
    Webhook(new).verify(last.body, last.headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(old).verify(last.body, last.headers)

    # The secrets travel neither in the message nor in the logs (the sidecar logs at DEBUG here).
    output = sidecar.output()
    for secret in (old, new):
        assert secret not in output and secret[6:] not in output
        assert all(secret[6:].encode() not in r.body for r in receiver.snapshot())


def test_blocked_targets_are_dead_lettered_without_a_connection(
    db: psycopg.Connection,
    receiver: Receiver,
    sidecar_factory: Callable[..., Sidecar],
    nats_server: NatsServer,
) -> None:
    configure(db, "SSRF", "ssrf")
    port = receiver.url.rsplit(":", 1)[1]
    hook = add_webhook(db, "internal", f"http://127.0.0.1:{port}/w", "ssrf.a")
    sidecar = sidecar_factory(env={"WEBHOOK_ALLOW_NETWORKS": ""})  # the default policy: loopback is blocked
    wait_ready(db)
    publish_raw(
        nats_server.url,
        "ssrf.x",
        [
            envelope(hook, {"i": 1}, "e1"),
            json.dumps({"webhook_url": f"http://localhost:{port}/name", "data": {"i": 2}}).encode(),
            json.dumps({"webhook_url": f"http://[::ffff:127.0.0.1]:{port}/m", "data": {"i": 3}}).encode(),
        ],
    )
    assert wait_until(lambda: len(dead_letters(db)) == 3, timeout=20), dead_letters(db)
    assert {r for r, _ in dead_letters(db)} == {"ssrf_blocked"}
    assert any("loopback" in e for _, e in dead_letters(db))
    assert receiver.snapshot() == []  # the listening receiver saw nothing
    # not retried: one attempt row each, no retry rows
    assert scalar(db, "SELECT count(*) FROM rule_nats_retries") == 0

    # The endpoint's own allow-list opens it (and only it); the dead letter can be replayed.
    with applied(sidecar):
        db.execute(
            "UPDATE rule_webhooks SET allow_networks = '{127.0.0.1/32}' WHERE webhook_id = %s", (hook,)
        )
    db.execute("SELECT rule_nats_replay_dead_letters(p_reason => 'ssrf_blocked')")
    assert wait_until(lambda: len(receiver.snapshot()) == 1, timeout=20)
    assert receiver.snapshot()[0].path == "/w"
    assert wait_until(lambda: len(dead_letters(db)) == 5, timeout=20)  # the two bare URLs again

    # The global allow-list in SQL opens loopback for everyone.
    with applied(sidecar):
        db.execute("UPDATE rule_nats_delivery_settings SET allow_networks = '{127.0.0.0/8}'")
    publish_raw(
        nats_server.url,
        "ssrf.x",
        [json.dumps({"webhook_url": f"http://localhost:{port}/name", "data": {"i": 4}}).encode()],
    )
    assert wait_until(lambda: len(receiver.snapshot()) == 2, timeout=20)

    # https_only refuses plain http even where the network is allowed.
    with applied(sidecar):
        db.execute("UPDATE rule_webhooks SET https_only = true WHERE webhook_id = %s", (hook,))
    publish_raw(nats_server.url, "ssrf.x", [envelope(hook, {"i": 5}, "e5")])
    assert wait_until(lambda: len(dead_letters(db)) == 6, timeout=20)
    assert "https_only" in dead_letters(db)[-1][1]
    assert len(receiver.snapshot()) == 2


def test_bad_input_is_refused_with_a_reason(
    db: psycopg.Connection,
    receiver: Receiver,
    sidecar_factory: Callable[..., Sidecar],
    nats_server: NatsServer,
) -> None:
    configure(db, "BAD", "bad")
    hook = add_webhook(db, "plain", receiver.url + "/p", "bad.a")
    db.execute("UPDATE rule_nats_delivery_settings SET max_payload_bytes = 300")
    sidecar_factory()
    wait_ready(db)
    publish_raw(
        nats_server.url,
        "bad.x",
        [
            envelope(hook, {"pad": "x" * 400}, "too-big"),
            envelope(hook, {"i": 1}, "injected", headers={"X-Bad": "a\r\nX-Injected: 1"}),
            envelope(
                hook,
                {"i": 2},
                "dropped",
                headers={"Host": "evil.example", "webhook-id": "forged", "X-Ok": "1"},
            ),
        ],
    )
    assert wait_until(lambda: len(dead_letters(db)) == 2, timeout=20)
    reasons = dict(
        db.execute("SELECT message_id, reason FROM rule_nats_dead_letters").fetchall()  # type: ignore[arg-type]
    )
    assert reasons.pop("injected") == "invalid_header"
    # an oversized message is not parsed at all, so it is known by its stream position
    assert list(reasons.values()) == ["payload_too_large"] and next(iter(reasons)).startswith("stream-BAD-")
    (req,) = receiver.wait_for(1, timeout=20)
    assert req.headers["X-Ok"] == "1"
    assert req.headers["Host"].startswith("127.0.0.1:")
    assert req.headers["webhook-id"] == "dropped"
    assert "X-Injected" not in req.headers
    assert wait_until(
        lambda: (
            scalar(db, "SELECT notes FROM rule_nats_delivery_attempts WHERE message_id = 'dropped'")
            == "dropped headers: Host, webhook-id"
        ),
        timeout=10,
    )


def test_rate_limited_endpoint_slows_only_itself(
    db: psycopg.Connection,
    receiver: Receiver,
    sidecar_factory: Callable[..., Sidecar],
    nats_server: NatsServer,
) -> None:
    configure(db, "RATE", "rate", batch_size=40)
    slow = add_webhook(db, "slow", receiver.url + "/slow", "rate.a", rate_limit_per_second=10)
    fast = add_webhook(db, "fast", receiver.url + "/fast", "rate.b")
    sidecar_factory()
    wait_ready(db)
    n_slow, n_fast = 40, 400
    bodies = [envelope(slow, {"i": i}) for i in range(n_slow)]
    bodies += [envelope(fast, {"i": i}) for i in range(n_fast)]
    publish_raw(nats_server.url, "rate.x", bodies)
    assert wait_until(lambda: len(receiver.snapshot()) == n_slow + n_fast, timeout=60)
    slow_times = sorted(r.received_at for r in receiver.snapshot() if r.path == "/slow")
    rate = (len(slow_times) - 1) / (slow_times[-1] - slow_times[0])
    assert 8.0 <= rate <= 12.0, rate
    # The other endpoint was not held back: all of it arrived while the slow one was still going
    # (a second of it at least, at 10 a second).
    paths = [r.path for r in sorted(receiver.snapshot(), key=lambda r: r.received_at)]
    last_fast = len(paths) - 1 - paths[::-1].index("/fast")
    assert paths[last_fast:].count("/slow") >= 10, paths
    assert scalar(db, "SELECT count(*) FROM rule_nats_dead_letters") == 0
    # waiting for the limit used up no attempts
    assert scalar(db, "SELECT max(attempt) FROM rule_nats_delivery_attempts") == 1


def test_circuit_opens_probes_and_closes(
    request: pytest.FixtureRequest,
    db: psycopg.Connection,
    receiver: Receiver,
    sidecar_factory: Callable[..., Sidecar],
    nats_server: NatsServer,
) -> None:
    configure(db, "CB", "cb", retry_initial_seconds=0.2, retry_max_backoff_seconds=0.5, retry_max_attempts=50)
    hook = add_webhook(
        db, "flaky", receiver.url + "/f", "cb.a", circuit_failure_threshold=3, circuit_open_seconds=1
    )
    broken = {"on": True}
    receiver.responder = lambda req: Response(status=500 if broken["on"] else 200)
    listen = psycopg.connect(db.info.dsn, autocommit=True)
    request.addfinalizer(listen.close)
    listen.execute("LISTEN rule_nats_endpoint_health")
    sidecar_factory()
    wait_ready(db)
    publish_raw(nats_server.url, "cb.x", [envelope(hook, {"i": i}) for i in range(20)])

    def status() -> str:
        row = db.execute("SELECT status FROM nats_endpoint_health WHERE webhook_id = %s", (hook,)).fetchone()
        return str(row[0]) if row else ""

    assert wait_until(lambda: status() == "open", timeout=20), status()
    # While open, only probes reach the endpoint: a handful of requests in 3 s, not hundreds.
    before = len(receiver.snapshot())
    time.sleep(3.0)
    probes = len(receiver.snapshot()) - before
    assert probes <= 4, probes
    broken["on"] = False
    assert wait_until(
        lambda: (
            scalar(db, "SELECT count(*) FROM rule_nats_delivery_attempts WHERE outcome = 'delivered'") == 20
        ),
        timeout=30,
    )
    assert wait_until(lambda: status() == "healthy", timeout=20), status()
    assert scalar(db, "SELECT count(*) FROM rule_nats_dead_letters") == 0
    # attempts were not burned while the circuit was open: far fewer than 20 x 50
    assert db.execute("SELECT max(attempt) FROM rule_nats_delivery_attempts").fetchone()[0] < 10  # type: ignore[index]
    events = [json.loads(n.payload)["event"] for n in listen.notifies(timeout=1, stop_after=50)]
    assert "circuit_open" in events and "circuit_closed" in events


def test_410_disables_the_endpoint_and_enabling_releases_held_messages(
    request: pytest.FixtureRequest,
    db: psycopg.Connection,
    receiver: Receiver,
    sidecar_factory: Callable[..., Sidecar],
    nats_server: NatsServer,
) -> None:
    configure(db, "GONE", "gone")
    hook = add_webhook(db, "gone", receiver.url + "/g", "gone.a")
    gone = {"on": True}
    receiver.responder = lambda req: Response(status=410 if gone["on"] else 200)
    listen = psycopg.connect(db.info.dsn, autocommit=True)
    request.addfinalizer(listen.close)
    listen.execute("LISTEN rule_nats_endpoint_health")
    sidecar_factory()
    wait_ready(db)
    publish_raw(nats_server.url, "gone.x", [envelope(hook, {"i": 1}, "g1")])
    assert wait_until(
        lambda: scalar(db, "SELECT enabled FROM rule_webhooks WHERE webhook_id = %s", (hook,)) is False,
        timeout=20,
    )
    row = db.execute(
        "SELECT status, disabled_reason FROM nats_endpoint_health WHERE webhook_id = %s", (hook,)
    ).fetchone()
    assert row == ("disabled", "HTTP 410 Gone")
    events = [json.loads(n.payload) for n in listen.notifies(timeout=2, stop_after=1)]
    assert events and events[0]["event"] == "disabled" and events[0]["webhook_id"] == hook
    # held, not dropped: the message waits, and so does the next one
    publish_raw(nats_server.url, "gone.x", [envelope(hook, {"i": 2}, "g2")])
    assert wait_until(
        lambda: scalar(db, "SELECT count(*) FROM rule_nats_retries WHERE webhook_id = %s", (hook,)) == 2,
        timeout=20,
    )
    assert len(receiver.snapshot()) == 1
    assert scalar(db, "SELECT count(*) FROM rule_nats_dead_letters") == 0
    gone["on"] = False
    assert scalar(db, "SELECT rule_nats_endpoint_enable(%s)", (hook,)) is True
    assert wait_until(lambda: len(receiver.snapshot()) == 3, timeout=20)
    assert {r.headers["webhook-id"] for r in receiver.snapshot()[1:]} == {"g1", "g2"}
    assert wait_until(
        lambda: (
            scalar(db, "SELECT status FROM nats_endpoint_health WHERE webhook_id = %s", (hook,)) == "healthy"
        ),
        timeout=20,
    )


def test_429_with_retry_after_pauses_the_whole_endpoint(
    db: psycopg.Connection,
    receiver: Receiver,
    sidecar_factory: Callable[..., Sidecar],
    nats_server: NatsServer,
) -> None:
    configure(db, "BACK", "back")
    hook = add_webhook(db, "busy", receiver.url + "/b", "back.a", max_concurrency=1)
    first = {"done": False}

    def respond(req: Request) -> Response:
        if not first["done"]:
            first["done"] = True
            return Response(status=429, headers={"Retry-After": "2"})
        return Response()

    receiver.responder = respond
    sidecar_factory()
    wait_ready(db)
    publish_raw(nats_server.url, "back.x", [envelope(hook, {"i": i}) for i in range(5)])
    got = receiver.wait_for(6, timeout=30)
    assert len(got) == 6
    t0 = got[0].received_at
    assert all(r.received_at - t0 >= 1.9 for r in got[1:]), [round(r.received_at - t0, 2) for r in got]


def test_concurrency_limit_bounds_requests_in_flight(
    db: psycopg.Connection,
    receiver: Receiver,
    sidecar_factory: Callable[..., Sidecar],
    nats_server: NatsServer,
) -> None:
    configure(db, "CONC", "conc", batch_size=32)
    hook = add_webhook(db, "narrow", receiver.url + "/n", "conc.a", max_concurrency=2)
    # Each answer takes 0.2 s, so that requests overlap unless the limit holds them back.
    receiver.responder = lambda req: Response(delay=0.2)
    sidecar_factory()
    wait_ready(db)
    publish_raw(nats_server.url, "conc.x", [envelope(hook, {"i": i}) for i in range(16)])
    assert wait_until(
        lambda: (
            scalar(db, "SELECT count(*) FROM rule_nats_delivery_attempts WHERE outcome = 'delivered'") == 16
        ),
        timeout=30,
    )
    assert receiver.max_in_flight == 2, receiver.max_in_flight


def test_rate_limit_holds_across_two_sidecars(
    db: psycopg.Connection,
    receiver: Receiver,
    sidecar_factory: Callable[..., Sidecar],
    nats_server: NatsServer,
) -> None:
    configure(db, "RATE2", "rate2", batch_size=20)
    slow = add_webhook(db, "slow2", receiver.url + "/slow", "rate2.a", rate_limit_per_second=10)
    sidecars = [sidecar_factory(env={"HEARTBEAT_INTERVAL": "0.5"}, name=name) for name in ("r-1", "r-2")]
    wait_ready(db)
    assert wait_until(
        lambda: (
            scalar(
                db,
                "SELECT count(*) FROM nats_worker_status WHERE status IN ('ACTIVE', 'IDLE') AND consumers <> '{}'",
            )
            == 2
        ),
        timeout=20,
    )
    # A heartbeat of each has told it that both share the endpoint.
    for sidecar in sidecars:
        wait_for(
            sidecar.output, lambda out: "2 live workers share" in out, "a heartbeat that sees both workers"
        )
    publish_raw(nats_server.url, "rate2.x", [envelope(slow, {"i": i}) for i in range(60)])
    assert wait_until(lambda: len(receiver.snapshot()) == 60, timeout=60)
    times = sorted(r.received_at for r in receiver.snapshot())
    rate = (len(times) - 1) / (times[-1] - times[0])
    print(f"two sidecars, endpoint limited to 10/s: {rate:.2f}/s")
    # Never over the limit; under it when JetStream hands one sidecar more of the messages than the other.
    assert 6.0 <= rate <= 12.0, rate
    by_worker = dict(
        db.execute("SELECT worker_name, count(*) FROM rule_nats_delivery_attempts GROUP BY 1").fetchall()  # type: ignore[arg-type]
    )
    assert set(by_worker) == {"r-1", "r-2"}, by_worker  # both delivered, together at the endpoint's rate
