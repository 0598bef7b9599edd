"""A TCP listener that only counts the connections it accepts: where a blocked address leads, so a
test sees whether anything connected there (it never answers)."""

from __future__ import annotations

import socket
import threading


class Trap:
    """Listeners on ``hosts`` (one port for all: ``port``, or a free one picked on the first host),
    counting accepted connections. The first host must bind (OSError otherwise); the others are
    best effort (::1 is missing on some machines)."""

    def __init__(self, port: int = 0, hosts: tuple[str, ...] = ("127.0.0.1", "::1")) -> None:
        self.accepted = 0
        self.socks: list[socket.socket] = []
        for i, host in enumerate(hosts):
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            sock = socket.socket(family)
            try:
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind((host, port))
            except OSError:
                sock.close()
                if i == 0:
                    raise
                continue
            port = sock.getsockname()[1]
            self.socks.append(sock)
        self.port = port
        for sock in self.socks:
            sock.listen(16)
            sock.settimeout(0.1)
            threading.Thread(target=self._accept, args=(sock,), daemon=True).start()

    def _accept(self, sock: socket.socket) -> None:
        while True:
            try:
                conn, _ = sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.accepted += 1
            conn.close()

    def close(self) -> None:
        for sock in self.socks:
            sock.close()
