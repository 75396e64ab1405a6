"""Zero-copy relay of a plain-HTTP response body: backend -> pipe -> client.

Used for large bodies of known length when both sides are plain TCP. The
bytes never enter Python: os.splice moves them through a kernel pipe. The
event loop's own transports step aside for the duration (reading paused on
the backend side, the write buffer empty on the client side), and the
readiness waits run on duplicated descriptors so they do not collide with
the transports' registrations.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
from typing import Any

# Bodies below this size are not worth the set-up (a pipe, four syscalls).
MIN_BODY = 1 << 20
_PIPE_SIZE = 1 << 20
_F_SETPIPE_SZ = 1031
_FLAGS = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)
AVAILABLE = hasattr(os, "splice")


class BackendEnded(Exception):
    """The backend closed before the whole body had come."""


class ClientEnded(Exception):
    """The client went away mid-body."""


def plain_socket_fd(transport: Any) -> int | None:
    """The socket's descriptor when the transport is plain TCP, else None."""
    if transport is None or transport.is_closing():
        return None
    if transport.get_extra_info("sslcontext") or transport.get_extra_info("ssl_object"):
        return None
    sock = transport.get_extra_info("socket")
    if sock is None:
        return None
    try:
        return int(sock.fileno())
    except (OSError, ValueError):
        return None


async def relay(src_fd: int, dst_fd: int, count: int, idle_timeout: float) -> int:
    """Move exactly `count` bytes from src to dst; returns the bytes delivered.

    Raises BackendEnded, ClientEnded, or TimeoutError after `idle_timeout`
    seconds without progress either way.
    """
    loop = asyncio.get_running_loop()
    src, dst = os.dup(src_fd), os.dup(dst_fd)
    pipe_r, pipe_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    capacity = _PIPE_SIZE
    try:
        try:
            fcntl.fcntl(pipe_w, _F_SETPIPE_SZ, _PIPE_SIZE)
        except OSError:  # over /proc/sys/fs/pipe-max-size: the default 64 KiB
            capacity = 64 * 1024
        remaining, in_pipe, delivered = count, 0, 0
        while remaining or in_pipe:
            moved = False
            if remaining and in_pipe < capacity:
                try:
                    n = os.splice(
                        src, pipe_w, min(remaining, capacity - in_pipe), flags=_FLAGS
                    )
                except BlockingIOError:
                    n = -1
                except (ConnectionResetError, BrokenPipeError) as exc:
                    raise BackendEnded(str(exc)) from None
                if n == 0:
                    raise BackendEnded(f"{remaining} of {count} bytes never came")
                if n > 0:
                    remaining -= n
                    in_pipe += n
                    moved = True
            if in_pipe:
                try:
                    n = os.splice(pipe_r, dst, in_pipe, flags=_FLAGS)
                except BlockingIOError:
                    n = -1
                except (ConnectionResetError, BrokenPipeError) as exc:
                    raise ClientEnded(str(exc)) from None
                if n > 0:
                    in_pipe -= n
                    delivered += n
                    moved = True
            if not moved:
                await _ready(
                    loop,
                    src if remaining and in_pipe < capacity else None,
                    dst if in_pipe else None,
                    idle_timeout,
                )
        return delivered
    finally:
        for fd in (src, dst, pipe_r, pipe_w):
            os.close(fd)


async def _ready(
    loop: asyncio.AbstractEventLoop,
    readable: int | None,
    writable: int | None,
    idle_limit: float,
) -> None:
    """Until src is readable or dst writable (whichever is being waited for)."""
    waiter = loop.create_future()

    def wake() -> None:
        if not waiter.done():
            waiter.set_result(None)

    if readable is not None:
        loop.add_reader(readable, wake)
    if writable is not None:
        loop.add_writer(writable, wake)
    try:
        await asyncio.wait_for(waiter, idle_limit)
    finally:
        if readable is not None:
            loop.remove_reader(readable)
        if writable is not None:
            loop.remove_writer(writable)
