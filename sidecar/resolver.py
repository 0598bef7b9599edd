"""Name resolution for deliveries: the system resolver's answer, filtered by the network policy."""

from __future__ import annotations

import socket

from aiohttp.abc import AbstractResolver, ResolveResult

from sidecar.ssrf import BlockedAddress, NetworkPolicy, check_address


class PolicyResolver(AbstractResolver):
    """Resolves with the system resolver and keeps only the addresses the policy allows.

    The connection is then opened to exactly these addresses (one lookup, no second one to
    rebind), and ``http1.Pool`` checks each address once more right before its connect.
    """

    def __init__(self, policy: NetworkPolicy, base: AbstractResolver) -> None:
        self.policy = policy
        self.base = base

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self.base.resolve(host, port, family)
        allowed: list[ResolveResult] = []
        first: BlockedAddress | None = None
        for r in results:
            try:
                check_address(r["host"], self.policy)
            except BlockedAddress as exc:
                first = first or exc
                continue
            allowed.append(r)
        if not allowed:
            if first is not None:
                raise BlockedAddress(f"{host} ({first.address})", first.reason)
            raise OSError(f"{host} did not resolve")
        return allowed

    async def close(self) -> None:
        await self.base.close()
