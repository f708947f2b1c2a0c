"""Asking ``btmm up`` over its control socket (``control.py``): one request, one reply.

Blocking and short, for the commands (``btmm status``, ``ping``, ``down``) and the lab. Every
failure is a ``BtmmError`` that says what to do: no daemon (``DaemonNotRunning``), not
allowed (``PermissionNeeded``), an error reply (``ControlError``), a daemon that does not
answer in time.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from pathlib import Path
from typing import Any

from btmm_core.daemon.control import Op, ProtocolError, Reply, Request
from btmm_core.errors import BtmmError, ControlError, DaemonNotRunning, PermissionNeeded

#: the largest reply taken (a status of hundreds of peers is far below it)
MAX_REPLY = 16 << 20
START_HINT = "start it with `btmm up` (or `systemctl start btmm`)"


def ask(path: Path, op: Op, args: dict[str, Any] | None = None,
        timeout: float = 5.0) -> dict[str, Any]:
    """The result of ``op``; raises when there is no daemon, no answer or an error reply."""
    deadline = time.monotonic() + timeout
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        try:
            sock.connect(os.fspath(path))
        except FileNotFoundError as exc:
            raise DaemonNotRunning(f"the btmm daemon is not running (no {path})",
                                   hint=START_HINT) from exc
        except ConnectionRefusedError as exc:
            raise DaemonNotRunning(f"the btmm daemon is not running ({path} is left from a "
                                   "run that ended without cleaning up)",
                                   hint=START_HINT) from exc
        except PermissionError as exc:
            raise PermissionNeeded(f"cannot open {path}: the control socket is root-only",
                                   hint="run the command with sudo") from exc
        except TimeoutError as exc:
            raise BtmmError(f"the daemon did not accept a connection on {path} within "
                            f"{timeout:g} s", hint="it may be hung; see its log") from exc
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            # a daemon that refuses may close before all is sent; its reply says why
            sock.sendall(Request(op, args or {}).to_line())
        line = _read_line(sock, deadline, path)
    finally:
        sock.close()
    try:
        reply = Reply.parse(line)
    except ProtocolError as exc:
        raise BtmmError(f"the daemon's answer cannot be read: {exc.what}",
                        hint="use the `btmm` command of the same version as `btmm up`"
                        ) from exc
    if not reply.ok:
        assert reply.code is not None
        raise ControlError(reply.what, hint=reply.hint, code=reply.code.text)
    assert reply.result is not None
    return reply.result


def _read_line(sock: socket.socket, deadline: float, path: Path) -> bytes:
    buf = bytearray()
    while not buf.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0:
            raise BtmmError(f"the daemon did not answer on {path} in time",
                            hint="it may be busy or hung; see its log")
        sock.settimeout(left)
        try:
            chunk = sock.recv(1 << 16)
        except TimeoutError:
            continue
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            raise BtmmError("the daemon closed the connection without answering",
                            hint="see its log (it may have stopped)")
        buf += chunk
        if len(buf) > MAX_REPLY:
            raise BtmmError(f"the daemon's answer is over {MAX_REPLY} bytes")
    return bytes(buf)
