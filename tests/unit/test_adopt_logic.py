"""Adopt, don't overwrite: which settings of an existing stream the registry may change (pure)."""

from __future__ import annotations

from nats.js.api import RetentionPolicy, StorageType, StreamConfig

from sidecar.reconcile import (
    STREAM_FIELD_COLUMN,
    adopted_stream,
    durability_changes,
    plan_update,
    stream_config,
    stream_differs,
)
from sidecar.registry import stream_from_row


def _row(**changes: object) -> dict[str, object]:
    current = StreamConfig(
        name="S", subjects=["s.>"], num_replicas=3, storage=StorageType.FILE, retention=RetentionPolicy.LIMITS,
        description="by hand", max_age=60.0, duplicate_window=30.0, max_msgs=-1, max_bytes=-1, max_msg_size=-1,
    )  # fmt: skip
    adopted = adopted_stream(current)
    row = {
        "stream_name": "S",
        "config_name": "default",
        "enabled": True,
        **adopted,
        "adopted_config": adopted,
    }
    row.update(changes)
    return row


def _current() -> StreamConfig:
    return StreamConfig(
        name="S", subjects=["s.>"], num_replicas=3, storage=StorageType.FILE, retention=RetentionPolicy.LIMITS,
        description="by hand", max_age=60.0, duplicate_window=30.0, max_msgs=-1, max_bytes=-1, max_msg_size=-1,
        allow_direct=True,
    )  # fmt: skip


def test_an_adopted_row_changes_nothing() -> None:
    s = stream_from_row(_row())
    current = _current()
    plan = plan_update(current, stream_config(s), stream_differs(current, stream_config(s)), STREAM_FIELD_COLUMN,
                       s.adopted_unchanged)  # fmt: skip
    assert plan.changed == ()


def test_replicas_lowered_behind_the_workers_back_are_kept_but_a_dba_change_applies() -> None:
    current = _current()
    current.num_replicas = 5  # raised with the nats CLI after the adoption: the operator's, kept
    s = stream_from_row(_row())
    want = stream_config(s)
    plan = plan_update(current, want, stream_differs(current, want), STREAM_FIELD_COLUMN, s.adopted_unchanged)
    assert plan.changed == () and plan.kept == ("num_replicas",)
    # The DBA lowers replicas in the row: explicit, applied, and reported as a durability change.
    s = stream_from_row(_row(replicas=1))
    want = stream_config(s)
    plan = plan_update(current, want, stream_differs(current, want), STREAM_FIELD_COLUMN, s.adopted_unchanged)
    assert plan.changed == ("num_replicas",)
    assert plan.config.num_replicas == 1 and plan.config.allow_direct is True  # the rest as JetStream has it
    assert durability_changes(current, want, plan.changed) == ["replicas 5 -> 1"]


def test_a_row_a_dba_wrote_is_applied_as_it_is() -> None:
    s = stream_from_row(_row(adopted_config=None, replicas=1))
    assert s.adopted_unchanged == frozenset()
    current = _current()
    want = stream_config(s)
    plan = plan_update(current, want, stream_differs(current, want), STREAM_FIELD_COLUMN, s.adopted_unchanged)
    assert "num_replicas" in plan.changed
