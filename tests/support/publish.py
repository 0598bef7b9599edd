"""Publishing test messages to JetStream: numbered webhook messages, a hundred in flight at a time."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import nats


def publish_ids(url: str, subject: str, ids: range, webhook_url: str, **auth: Any) -> None:
    """One message per id: ``{"webhook_url": ..., "data": {"id": i}}``; ``auth`` goes to nats.connect."""

    async def go() -> None:
        nc = await nats.connect(url, **auth)
        js = nc.jetstream(timeout=10)
        for start in range(ids.start, ids.stop, 100):
            await asyncio.gather(
                *(
                    js.publish(subject, json.dumps({"webhook_url": webhook_url, "data": {"id": i}}).encode())
                    for i in range(start, min(ids.stop, start + 100))
                )
            )
        await nc.close()

    asyncio.run(go())
