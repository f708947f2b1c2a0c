"""The daemon's control protocol (core): JSON lines over its Unix socket, version 1.

Not an RFC: btmm's own small request/response API between ``btmm up`` and the commands that
ask it about *now* (``btmm status``, ``btmm ping``, ``btmm down``; docs/architecture.md
section 4, step 8). One request is one line of UTF-8 JSON, one reply is one line::

    {"v": 1, "op": "status"}
    {"v": 1, "ok": true, "result": {...}}

    {"v": 1, "op": "ping", "args": {"peer": "desktop", "count": 3}}
    {"v": 1, "ok": false, "error": {"code": "failed", "what": "...", "hint": "..."}}

``v`` is the protocol version the request is written in; a server answers a version it does
not speak with ``unsupported_version`` and the list of those it does (``versions``), so a newer
``btmm status`` talking to an older daemon says so instead of guessing. Every reply carries the
server's version. A line that is not JSON, not an object, too long or asks for an unknown op
gets an error reply, never a dropped connection or a crash; only a line over ``MAX_LINE`` ends
the connection (nothing after it can be framed), after its error reply.

This module parses and renders; it opens no socket (``control_server.py`` serves it,
``control_client.py`` asks it).
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass, field
from typing import Any

#: the protocol version this module speaks
VERSION = 1
#: every version a server of this module answers
VERSIONS = (1,)
#: the longest request line (bytes, without its newline); replies have no such bound
MAX_LINE = 4096


class Op(enum.StrEnum):
    """What a request asks for (version 1)."""

    HELLO = "hello"  #: versions, ops and the daemon's pid and software version
    STATUS = "status"  #: what ``btmm status --json`` shows, as of the request
    PING = "ping"  #: ICMPv6 echo to a peer's ULA through the tunnel, and the path used
    DOWN = "down"  #: stop the daemon cleanly; answered once it has stopped


class ErrorCode(enum.IntEnum):
    MALFORMED = 1  #: not UTF-8, not JSON, not an object, or a field of the wrong type
    UNSUPPORTED_VERSION = 2
    UNKNOWN_OP = 3
    BAD_ARGUMENTS = 4
    TOO_LONG = 5  #: over ``MAX_LINE``; the connection is closed after the reply
    FAILED = 6  #: the op ran and could not do it (an unknown peer, ...)
    REFUSED = 7  #: the caller may not ask (not root, too many connections)
    INTERNAL = 8  #: a bug in the daemon; its log has the traceback

    @property
    def text(self) -> str:
        return self.name.lower()


class ProtocolError(ValueError):
    """A request or reply line that cannot be taken; ``reply`` is what to answer."""

    def __init__(self, code: ErrorCode, what: str, hint: str | None = None) -> None:
        super().__init__(what)
        self.code = code
        self.what = what
        self.hint = hint


@dataclass(frozen=True)
class Request:
    op: Op
    args: dict[str, Any] = field(default_factory=dict)
    v: int = VERSION

    def to_line(self) -> bytes:
        body: dict[str, Any] = {"v": self.v, "op": str(self.op)}
        if self.args:
            body["args"] = self.args
        return json.dumps(body, separators=(",", ":")).encode() + b"\n"


@dataclass(frozen=True)
class Reply:
    """``ok`` with a ``result``, or an error with its code, what happened and what to do."""

    ok: bool
    result: dict[str, Any] | None = None
    code: ErrorCode | None = None
    what: str = ""
    hint: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def success(cls, result: dict[str, Any]) -> Reply:
        return cls(True, result)

    @classmethod
    def error(cls, code: ErrorCode, what: str, hint: str | None = None,
              **extra: Any) -> Reply:
        return cls(False, None, code, what, hint, extra)

    def to_line(self) -> bytes:
        body: dict[str, Any] = {"v": VERSION, "ok": self.ok}
        if self.ok:
            body["result"] = self.result or {}
        else:
            assert self.code is not None
            body["error"] = {"code": self.code.text, "what": self.what, "hint": self.hint,
                             **self.extra}
        return json.dumps(body, separators=(",", ":"), default=str).encode() + b"\n"

    @classmethod
    def parse(cls, line: bytes) -> Reply:
        """A reply line from a server; ``ProtocolError`` (MALFORMED) when it is not one."""
        obj = _object(line)
        ok = obj.get("ok")
        if ok is True:
            result = obj.get("result")
            if not isinstance(result, dict):
                raise ProtocolError(ErrorCode.MALFORMED, "a reply without a result object")
            return cls.success(result)
        err = obj.get("error")
        if ok is not False or not isinstance(err, dict):
            raise ProtocolError(ErrorCode.MALFORMED, "a reply that is neither ok nor an error")
        try:
            code = ErrorCode[str(err.get("code", "")).upper()]
        except KeyError:
            # a newer server's code: still an error, said in its own words
            code = ErrorCode.FAILED
        extra = {k: v for k, v in err.items() if k not in ("code", "what", "hint")}
        hint = err.get("hint")
        return cls(False, None, code, str(err.get("what", "")),
                   None if hint is None else str(hint), extra)


def _object(line: bytes) -> dict[str, Any]:
    try:
        obj = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ProtocolError(ErrorCode.MALFORMED, f"not UTF-8: {exc.reason}") from exc
    except ValueError as exc:  # json.JSONDecodeError, and nesting too deep for the parser
        raise ProtocolError(ErrorCode.MALFORMED, f"not JSON: {exc}",
                            hint='send one JSON object per line, e.g. {"v":1,"op":"status"}'
                            ) from exc
    except RecursionError as exc:
        raise ProtocolError(ErrorCode.MALFORMED, "JSON nested too deeply") from exc
    if not isinstance(obj, dict):
        raise ProtocolError(ErrorCode.MALFORMED, f"a JSON {type(obj).__name__}, not an object")
    return obj


def parse_request(line: bytes) -> Request:
    """One request line (its newline may be there or not); ``ProtocolError`` says what to
    answer when it cannot be taken."""
    if len(line.rstrip(b"\r\n")) > MAX_LINE:
        raise ProtocolError(ErrorCode.TOO_LONG, f"a request over {MAX_LINE} bytes")
    obj = _object(line)
    v = obj.get("v")
    if isinstance(v, bool) or not isinstance(v, int):
        raise ProtocolError(ErrorCode.MALFORMED, 'no protocol version: "v" must be an integer',
                            hint=f'send "v": {VERSION}')
    if v not in VERSIONS:
        raise ProtocolError(ErrorCode.UNSUPPORTED_VERSION,
                            f"protocol version {v} is not spoken here",
                            hint="use the `btmm` command of the same version as `btmm up`")
    op = obj.get("op")
    if not isinstance(op, str):
        raise ProtocolError(ErrorCode.MALFORMED, '"op" must be a string')
    try:
        known = Op(op)
    except ValueError as exc:
        raise ProtocolError(ErrorCode.UNKNOWN_OP, f"unknown op {op[:64]!r}",
                            hint="ops: " + ", ".join(o.value for o in Op)) from exc
    args = obj.get("args", {})
    if not isinstance(args, dict):
        raise ProtocolError(ErrorCode.MALFORMED, '"args" must be an object')
    return Request(known, args, v)


def error_reply(err: ProtocolError) -> Reply:
    extra: dict[str, Any] = {}
    if err.code == ErrorCode.UNSUPPORTED_VERSION:
        extra["versions"] = list(VERSIONS)
    return Reply.error(err.code, err.what, err.hint, **extra)


# -- arguments of the ops ---------------------------------------------------------------------

#: bounds of ``ping``: a request can never make the daemon send more than this
MAX_PING_COUNT = 20
MAX_PING_TIMEOUT = 10.0


@dataclass(frozen=True)
class PingArgs:
    peer: str
    count: int = 3
    interval: float = 0.2
    timeout: float = 2.0

    @classmethod
    def parse(cls, args: dict[str, Any]) -> PingArgs:
        peer = args.get("peer")
        if not isinstance(peer, str) or not peer or len(peer) > 255:
            raise ProtocolError(ErrorCode.BAD_ARGUMENTS, "ping needs a peer: a name, a host "
                                "label or a ULA", hint="e.g. btmm ping desktop")
        count = args.get("count", cls.count)
        if isinstance(count, bool) or not isinstance(count, int) \
                or not 1 <= count <= MAX_PING_COUNT:
            raise ProtocolError(ErrorCode.BAD_ARGUMENTS,
                                f"count must be an integer from 1 to {MAX_PING_COUNT}")
        interval = _number(args, "interval", cls.interval, 0.01, 1.0)
        timeout = _number(args, "timeout", cls.timeout, 0.1, MAX_PING_TIMEOUT)
        unknown = set(args) - {"peer", "count", "interval", "timeout"}
        if unknown:
            raise ProtocolError(ErrorCode.BAD_ARGUMENTS,
                                f"unknown ping arguments: {', '.join(sorted(unknown))}")
        return cls(peer, count, interval, timeout)


def _number(args: dict[str, Any], key: str, default: float, low: float, high: float) -> float:
    v = args.get(key, default)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not low <= v <= high:
        raise ProtocolError(ErrorCode.BAD_ARGUMENTS,
                            f"{key} must be a number from {low:g} to {high:g} (seconds)")
    return float(v)
