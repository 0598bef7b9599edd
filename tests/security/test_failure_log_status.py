"""A failure log that is enabled but broken shows in SQL (issue 13): before, only the session
whose publish failed saw a WARNING, and the failed publish was recorded nowhere."""

from __future__ import annotations

import psycopg
import pytest

from tests.conftest import FAILURE_LOG_PASSWORD
from tests.support.logins import Logins

STATUS = (
    "SELECT status, failures, last_failed_at IS NOT NULL, last_ok_at IS NOT NULL FROM nats_failure_log_status"
)


def _fail_a_publish(c: psycopg.Connection, subject: str) -> None:
    with pytest.raises(psycopg.errors.InvalidParameterValue), c.transaction():
        c.execute("SELECT rule_nats_publish(%s, '{}')", (subject,))


def test_a_broken_failure_log_shows_in_the_status_view(logins: Logins, stream: str) -> None:
    su = logins.su
    bad = stream.lower() + "..bad"
    with logins.connect("monitor") as monitor:
        assert monitor.execute(STATUS).fetchone() == ("unused", 0, False, False)
        with logins.connect("publisher") as publisher:
            _fail_a_publish(publisher, bad)  # recorded through the failure log
            assert monitor.execute(STATUS).fetchone() == ("ok", 0, False, True)
            # Broken: the server it reaches no longer answers (a changed port, password, pg_hba.conf).
            su.execute(
                "UPDATE rule_nats_private.failure_log SET conninfo = 'host=127.0.0.1 port=1 password=x'"
            )
            _fail_a_publish(publisher, bad)
            assert monitor.execute(STATUS).fetchone() == ("broken", 1, True, True)
            why = monitor.execute("SELECT rule_nats_failure_log_check()").fetchone()
            assert why is not None and why[0] is not None and "127.0.0.1" in why[0], why
            assert monitor.execute(STATUS).fetchone()[0] == "broken"  # type: ignore[index]
            # Repaired by a superuser: the check says so at once, and so does the next failed publish.
            su.execute("SELECT rule_nats_private.enable_failure_log(%s)", (FAILURE_LOG_PASSWORD,))
            assert monitor.execute("SELECT rule_nats_failure_log_check()").fetchone() == (None,)
            assert monitor.execute(STATUS).fetchone() == ("ok", 1, True, True)
            _fail_a_publish(publisher, bad)
            assert monitor.execute(STATUS).fetchone() == ("ok", 1, True, True)
    rows = su.execute("SELECT count(*) FROM rule_nats_publish_history WHERE NOT success").fetchone()
    assert rows == (2,)  # the first and the last failed publish; the middle one was lost
    # (Not enable_failure_log(NULL): the login role is the cluster's, other tests' databases use it.)
    su.execute("UPDATE rule_nats_private.failure_log SET conninfo = NULL")
    assert su.execute(STATUS).fetchone()[0] == "disabled"  # type: ignore[index]
    assert su.execute("SELECT rule_nats_failure_log_check()").fetchone()[0].startswith("not enabled")  # type: ignore[index]
