"""Fake peers: a backend that records every request, a host that must stay silent.

`Recorder` answers every request 200 with a small JSON body and the registry
API header, and keeps (method, target, headers, body) for the test to read.
`Tripwire` is a listening socket that counts every connection made to it: it
stands for "another host" a hostile request names, which zotlb must never
contact.
"""

from __future__ import annotations

import socket
import struct
import threading
from dataclasses import dataclass, field
from typing import Self


@dataclass
class Seen:
    method: str
    target: str
    headers: list[tuple[str, str]]
    body: bytes


def _read_head(conn: socket.socket, buf: bytearray) -> bytes | None:
    while b"\r\n\r\n" not in buf:
        chunk = conn.recv(65536)
        if not chunk:
            return None
        buf.extend(chunk)
    head, _, rest = bytes(buf).partition(b"\r\n\r\n")
    buf[:] = rest
    return head


def _read_exact(conn: socket.socket, buf: bytearray, n: int) -> bytes:
    while len(buf) < n:
        chunk = conn.recv(65536)
        if not chunk:
            raise ConnectionError("eof in body")
        buf.extend(chunk)
    out = bytes(buf[:n])
    del buf[:n]
    return out


def _read_line(conn: socket.socket, buf: bytearray) -> bytes:
    while b"\r\n" not in buf:
        chunk = conn.recv(65536)
        if not chunk:
            raise ConnectionError("eof in chunked body")
        buf.extend(chunk)
    line, _, rest = bytes(buf).partition(b"\r\n")
    buf[:] = rest
    return line


def _read_chunked(conn: socket.socket, buf: bytearray) -> bytes:
    body = bytearray()
    while True:
        size = int(_read_line(conn, buf).split(b";")[0], 16)
        if size == 0:
            while _read_line(conn, buf):  # trailers, then the empty line
                pass
            return bytes(body)
        body.extend(_read_exact(conn, buf, size))
        _read_line(conn, buf)


class _Listening:
    """A loopback listener on a free port; each connection goes to `_serve`."""

    _sock: socket.socket | None

    def start(self) -> Self:
        self._sock = socket.create_server(("127.0.0.1", 0))
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    @property
    def port(self) -> int:
        assert self._sock is not None
        return self._sock.getsockname()[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def hostport(self) -> str:
        return f"127.0.0.1:{self.port}"

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()

    def _accept(self) -> None:
        assert self._sock is not None
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            self._on_connection(conn)

    def _on_connection(self, conn: socket.socket) -> None:
        threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        raise NotImplementedError


@dataclass
class Recorder(_Listening):
    """A registry stand-in on a free loopback port."""

    name: str = "rec"
    probe_path: str = "/_probe"
    seen: list[Seen] = field(default_factory=list)
    _sock: socket.socket | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def requests(self) -> list[Seen]:
        """What reached the backend, the health probes left out."""
        with self._lock:
            return [s for s in self.seen if s.target != self.probe_path]

    def clear(self) -> None:
        with self._lock:
            self.seen.clear()

    def _serve(self, conn: socket.socket) -> None:
        buf = bytearray()
        with conn:
            try:
                while self._serve_one(conn, buf):
                    pass
            except (OSError, ValueError):
                return

    def _serve_one(self, conn: socket.socket, buf: bytearray) -> bool:
        head = _read_head(conn, buf)
        if head is None:
            return False
        lines = head.decode("latin-1").split("\r\n")
        method, target, _ = lines[0].split(" ", 2)
        headers = [tuple(x.strip() for x in line.split(":", 1)) for line in lines[1:]]
        names = {k.lower(): v for k, v in headers}
        if names.get("transfer-encoding", "").lower() == "chunked":
            body = _read_chunked(conn, buf)
        else:
            body = _read_exact(conn, buf, int(names.get("content-length", "0")))
        with self._lock:
            self.seen.append(Seen(method, target, headers, body))  # type: ignore[arg-type]
        payload = b"{}" if method != "HEAD" else b""
        conn.sendall(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
            b"Docker-Distribution-API-Version: registry/2.0\r\n"
            b"Content-Length: 2\r\n\r\n" + payload
        )
        return names.get("connection", "").lower() != "close"


@dataclass
class Tripwire(_Listening):
    """A listening socket that no request may ever reach."""

    contacts: int = 0
    _sock: socket.socket | None = None

    def _on_connection(self, conn: socket.socket) -> None:
        self.contacts += 1
        conn.close()


@dataclass
class FaultServer(_Listening):
    """A loopback server whose every connection is handled by `respond`.

    `respond(conn, head)` gets the socket and the request head (bytes up to
    the blank line) and does whatever fault the test needs.
    """

    respond: object
    _sock: socket.socket | None = None

    @property
    def name(self) -> str:
        return f"fault{self.port}"

    def _serve(self, conn: socket.socket) -> None:
        buf = bytearray()
        try:
            while True:
                head = _read_head(conn, buf)
                if head is None:
                    break
                if not self.respond(conn, head):  # type: ignore[operator]
                    break
        except OSError:
            pass
        finally:
            conn.close()


def reset(conn: socket.socket) -> None:
    """Close with a TCP RST rather than a FIN."""
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    conn.close()
