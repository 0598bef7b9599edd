"""Name resolution for deliveries: the system resolver's answer, filtered by the network policy.

``Resolver`` is the interface (aiohttp's resolver interface, which the tests' stub resolvers and
any aiohttp resolver still satisfy); ``SystemResolver`` asks the system (getaddrinfo, in the
event loop's thread pool), as aiohttp's default resolver did."""

from __future__ import annotations

import asyncio
import socket
from typing import Protocol, TypedDict

from sidecar.ssrf import BlockedAddress, NetworkPolicy, check_address

# Addresses only; AI_ADDRCONFIG: no IPv6 answers on a host without IPv6 (what aiohttp asked for).
_AI_ADDRCONFIG = getattr(socket, "AI_ADDRCONFIG", 0)
_NUMERIC = socket.NI_NUMERICHOST | socket.NI_NUMERICSERV


class ResolveResult(TypedDict):
    hostname: str  # the name asked for
    host: str  # one address it resolved to
    port: int
    family: int
    proto: int
    flags: int


class Resolver(Protocol):
    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]: ...

    async def close(self) -> None: ...


class SystemResolver:
    """getaddrinfo in the event loop's thread pool; socket.gaierror (an OSError) when nothing resolves."""

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, family=family, flags=_AI_ADDRCONFIG
        )
        out: list[ResolveResult] = []
        for fam, _, proto, _, address in infos:
            if fam == socket.AF_INET6:
                if len(address) < 3:
                    continue  # IPv6 not supported by this Python build
                if address[3]:
                    # A link-local address: its scope id (e.g. fe80::1%eth0) is part of it.
                    resolved, service = await loop.getnameinfo(address, _NUMERIC)
                    out.append(
                        ResolveResult(
                            hostname=host,
                            host=resolved,
                            port=int(service),
                            family=fam,
                            proto=proto,
                            flags=_NUMERIC,
                        )
                    )
                    continue
            out.append(
                ResolveResult(
                    hostname=host,
                    host=str(address[0]),
                    port=int(address[1]),
                    family=fam,
                    proto=proto,
                    flags=_NUMERIC,
                )
            )
        return out

    async def close(self) -> None:
        pass


class PolicyResolver:
    """Resolves with the system resolver and keeps only the addresses the policy allows.

    The connection is then opened to exactly these addresses (one lookup, no second one to
    rebind), and ``http1.Pool`` checks each address once more right before its connect.
    """

    def __init__(self, policy: NetworkPolicy, base: Resolver) -> None:
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
