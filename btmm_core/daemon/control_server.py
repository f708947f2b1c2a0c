"""The daemon's control socket (driver of ``control.py``): a Unix stream socket, mode 0600.

Served on the daemon's own event loop. The data plane never waits on it: the fast engine moves
packets on its own threads, and a request costs the loop one short call (``status`` reads
counters; ``ping`` awaits its replies without holding anything). Bounds, so that no client can
hurt the daemon: ``MAX_CONNECTIONS`` at once, one request line of at most ``MAX_LINE`` bytes,
``IDLE_TIMEOUT`` between requests. Only root and the daemon's own user may ask (the socket's
mode, and ``SO_PEERCRED`` on each connection in case the mode is ever loosened).

At start a socket file left by a crashed run (nothing accepts on it) is replaced; one that
answers means another daemon runs, and this one stops with that said.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import stat
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import structlog

from btmm_core.aio import within
from btmm_core.daemon.control import (
    MAX_LINE,
    ErrorCode,
    ProtocolError,
    Reply,
    Request,
    error_reply,
    parse_request,
)
from btmm_core.errors import BtmmError, ConfigError

log = structlog.get_logger("btmm.control")

MAX_CONNECTIONS = 16
IDLE_TIMEOUT = 60.0
#: after a request over ``MAX_LINE``: how much more of it is read and dropped, for how long
DISCARD_BYTES = 1 << 20
DISCARD_SECONDS = 2.0
#: how long a refused connection's request is waited for before the refusal is sent anyway
REFUSE_READ = 2.0
#: sun_path holds 108 bytes with its terminating NUL
MAX_PATH = 107

Handler = Callable[[Request], Awaitable[dict[str, Any]]]


def claim_path(path: Path) -> None:
    """Make ``path`` free for a new socket: remove what a crashed run left there; refuse when
    another daemon answers on it or it is not a socket."""
    if len(os.fsencode(path)) > MAX_PATH:
        raise ConfigError(f"the control socket path {path} is longer than {MAX_PATH} bytes",
                          hint="set control_socket under [host] to a shorter path")
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ConfigError(f"{path} exists and is not a socket",
                          hint="remove it, or set control_socket under [host] elsewhere")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(os.fspath(path))
    except (ConnectionRefusedError, FileNotFoundError):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        return
    except OSError as exc:  # a full backlog or a timeout: someone is there
        raise ConfigError(f"another process holds the control socket {path} ({exc})",
                          hint="stop the other `btmm up` first (`btmm down`)") from exc
    finally:
        probe.close()
    raise ConfigError(f"another btmm up answers on {path}",
                      hint="stop it first with `btmm down`, or give this one its own "
                      "state_dir")


def bind_private(path: Path) -> socket.socket:
    """A listening Unix socket at ``path`` that only its owner can open (0600 from the first
    moment: created under a umask that leaves nothing for group and others)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        old = os.umask(0o177)
        try:
            sock.bind(os.fspath(path))
        finally:
            os.umask(old)
        os.chmod(path, 0o600)
        sock.listen(MAX_CONNECTIONS)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def peer_uid(sock: socket.socket | None) -> int | None:
    if sock is None:
        return None
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return None
    _pid, uid, _gid = struct.unpack("3i", creds)
    return int(uid)


async def _discard(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """End our side, then read (and drop) what the client still sends, a bounded while: a
    socket closed with unread data resets the connection, and the client would lose the error
    reply that says why."""
    with contextlib.suppress(OSError, RuntimeError):
        writer.write_eof()
    left = DISCARD_BYTES
    with contextlib.suppress(TimeoutError, OSError):
        async with asyncio.timeout(DISCARD_SECONDS):
            while left > 0 and (chunk := await reader.read(min(left, 1 << 16))):
                left -= len(chunk)


class ControlServer:
    """Serves ``handler`` on ``path`` until ``close``."""

    def __init__(self, path: Path, handler: Handler) -> None:
        self.path = path
        self.handler = handler
        self._server: asyncio.Server | None = None
        self._inode: int | None = None
        self._connections: dict[asyncio.Task[Any], bool] = {}  # task -> busy with a request
        #: requests answered and refused since start, by op and error code
        self.requests = 0
        self.errors: dict[str, int] = {}

    async def start(self) -> None:
        claim_path(self.path)
        sock = bind_private(self.path)
        self._inode = os.stat(self.path).st_ino
        self._server = await asyncio.start_unix_server(self._client, sock=sock,
                                                       limit=MAX_LINE + 2)
        log.info("control socket", path=str(self.path))

    async def close(self, grace: float = 2.0) -> None:
        """Stop accepting; let requests being answered finish (a ``down`` is answered here,
        once the daemon stopped) for up to ``grace`` seconds; remove the socket file."""
        if self._server is not None:
            self._server.close()
        for task, busy in list(self._connections.items()):
            if not busy:
                task.cancel()
        busy_tasks = list(self._connections)
        if busy_tasks:
            _, late = await asyncio.wait(busy_tasks, timeout=grace)
            for task in late:
                task.cancel()
            await asyncio.gather(*busy_tasks, return_exceptions=True)
        with contextlib.suppress(OSError):
            if self._inode is not None and os.stat(self.path).st_ino == self._inode:
                os.unlink(self.path)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        try:
            uid = peer_uid(writer.get_extra_info("socket"))
            refusal = None
            if uid is not None and uid not in (0, os.getuid()):
                refusal = Reply.error(ErrorCode.REFUSED, "only root may ask the btmm daemon",
                                      hint="run it with sudo")
            elif len(self._connections) >= MAX_CONNECTIONS:
                refusal = Reply.error(ErrorCode.REFUSED, "too many control connections",
                                      hint="try again in a moment")
            if refusal is not None:
                self._count(ErrorCode.REFUSED.text)
                # the request is read (and not looked at) before the refusal goes out: a
                # client still sending into a closed socket would lose the reply that says why
                with contextlib.suppress(TimeoutError, ValueError):
                    await within(reader.readline(), REFUSE_READ)
                await self._send(writer, refusal)
                return
            self._connections[task] = False
            await self._serve(task, reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self._connections.pop(task, None)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _serve(self, task: asyncio.Task[Any], reader: asyncio.StreamReader,
                     writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                line = await within(reader.readline(), IDLE_TIMEOUT)
            except TimeoutError:
                return
            except ValueError:  # over the reader's limit: the rest of the line is unframed
                self._count(ErrorCode.TOO_LONG.text)
                await self._send(writer, error_reply(ProtocolError(
                    ErrorCode.TOO_LONG, f"a request over {MAX_LINE} bytes")))
                await _discard(reader, writer)
                return
            if not line:
                return
            if not line.strip():
                continue
            self._connections[task] = True
            try:
                reply = await self._answer(line)
            finally:
                self._connections[task] = False
            await self._send(writer, reply)

    async def _answer(self, line: bytes) -> Reply:
        try:
            request = parse_request(line)
        except ProtocolError as err:
            self._count(err.code.text)
            return error_reply(err)
        try:
            result = await self.handler(request)
        except ProtocolError as err:
            self._count(err.code.text)
            return error_reply(err)
        except BtmmError as err:
            self._count(ErrorCode.FAILED.text)
            return Reply.error(ErrorCode.FAILED, err.what, err.hint)
        except asyncio.CancelledError:
            raise
        except Exception:
            # a bug must cost the asker an answer, never the daemon its life
            log.exception("control request failed", op=str(request.op))
            self._count(ErrorCode.INTERNAL.text)
            return Reply.error(ErrorCode.INTERNAL, f"the daemon failed to answer {request.op}",
                               hint="see the daemon's log; please report it")
        self.requests += 1
        return Reply.success(result)

    def _count(self, code: str) -> None:
        self.errors[code] = self.errors.get(code, 0) + 1

    @staticmethod
    async def _send(writer: asyncio.StreamWriter, reply: Reply) -> None:
        writer.write(reply.to_line())
        await writer.drain()
