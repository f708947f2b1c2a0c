"""The control protocol (``daemon/control.py``), its server and client, without a daemon:
versioning, unknown ops, malformed and oversized lines get an error reply and never end the
server; the socket is 0600; a crashed run's socket is replaced, a live one is not; no daemon
is said clearly. The live daemon answering on it: tests/daemon/test_control_netns.py."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import stat
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from btmm_core.daemon.cli import down, ping, status
from btmm_core.daemon.control import (
    MAX_LINE,
    ErrorCode,
    Op,
    PingArgs,
    ProtocolError,
    Reply,
    Request,
    parse_request,
)
from btmm_core.daemon.control_client import ask
from btmm_core.daemon.control_server import MAX_CONNECTIONS, ControlServer, claim_path
from btmm_core.daemon.echo import ECHO_REPLY, ECHO_REQUEST, Echo, reply_filter
from btmm_core.errors import ConfigError, ControlError, DaemonNotRunning

# -- the protocol --------------------------------------------------------------------------


def test_request_round_trip() -> None:
    req = Request(Op.PING, {"peer": "desktop", "count": 2})
    assert req.to_line() == b'{"v":1,"op":"ping","args":{"peer":"desktop","count":2}}\n'
    assert parse_request(req.to_line()) == req
    assert parse_request(b'{"v":1,"op":"status"}') == Request(Op.STATUS)


@pytest.mark.parametrize(("line", "code"), [
    (b"status\n", ErrorCode.MALFORMED),
    (b"\xff\xfe{}\n", ErrorCode.MALFORMED),
    (b"[1, 2]\n", ErrorCode.MALFORMED),
    (b'{"op":"status"}\n', ErrorCode.MALFORMED),
    (b'{"v":"1","op":"status"}\n', ErrorCode.MALFORMED),
    (b'{"v":true,"op":"status"}\n', ErrorCode.MALFORMED),
    (b'{"v":2,"op":"status"}\n', ErrorCode.UNSUPPORTED_VERSION),
    (b'{"v":1,"op":"reboot"}\n', ErrorCode.UNKNOWN_OP),
    (b'{"v":1,"op":7}\n', ErrorCode.MALFORMED),
    (b'{"v":1,"op":"status","args":[]}\n', ErrorCode.MALFORMED),
    (b"[" * 100_000 + b"\n", ErrorCode.TOO_LONG),
    (b'{"v":1,"op":"status","x":"' + b"a" * MAX_LINE + b'"}\n', ErrorCode.TOO_LONG),
])
def test_bad_requests_are_refused_with_a_code(line: bytes, code: ErrorCode) -> None:
    with pytest.raises(ProtocolError) as info:
        parse_request(line)
    assert info.value.code == code
    assert info.value.what


def test_deep_nesting_within_the_line_limit_is_malformed_not_a_crash() -> None:
    with pytest.raises(ProtocolError) as info:
        parse_request(b"[" * 4000)
    assert info.value.code == ErrorCode.MALFORMED


def test_reply_round_trip_and_unknown_codes_of_a_newer_server() -> None:
    ok = Reply.success({"a": 1})
    assert Reply.parse(ok.to_line()) == ok
    err = Reply.error(ErrorCode.UNSUPPORTED_VERSION, "no", "upgrade", versions=[1])
    body = json.loads(err.to_line())
    assert body == {"v": 1, "ok": False, "error": {"code": "unsupported_version", "what": "no",
                                                   "hint": "upgrade", "versions": [1]}}
    assert Reply.parse(err.to_line()) == err
    newer = Reply.parse(b'{"v":2,"ok":false,"error":{"code":"quota","what":"later"}}')
    assert newer.code == ErrorCode.FAILED and newer.what == "later"
    for bad in (b'{"v":1}', b'{"v":1,"ok":true}', b"nope"):
        with pytest.raises(ProtocolError):
            Reply.parse(bad)


def test_ping_arguments_are_bounded() -> None:
    assert PingArgs.parse({"peer": "desktop"}) == PingArgs("desktop", 3, 0.2, 2.0)
    for bad in ({}, {"peer": ""}, {"peer": "d", "count": 0}, {"peer": "d", "count": 21},
                {"peer": "d", "count": True}, {"peer": "d", "interval": 0},
                {"peer": "d", "timeout": 60}, {"peer": "d", "flood": 1}):
        with pytest.raises(ProtocolError) as info:
            PingArgs.parse(bad)
        assert info.value.code == ErrorCode.BAD_ARGUMENTS


def test_echo_codec() -> None:
    req = Echo(ECHO_REQUEST, 0x1234, 7, b"token")
    wire = req.to_bytes()
    assert wire[:8] == bytes([128, 0, 0, 0, 0x12, 0x34, 0, 7])
    assert Echo.parse(wire) == req
    assert Echo.parse(bytes([ECHO_REPLY]) + wire[1:]) == Echo(ECHO_REPLY, 0x1234, 7, b"token")
    assert Echo.parse(wire[:7]) is None
    assert Echo.parse(bytes([1]) + wire[1:]) is None  # destination unreachable
    assert Echo.parse(wire[:1] + b"\x01" + wire[2:]) is None  # code must be 0
    words = reply_filter()
    assert len(words) == 32
    # only type 129 passes: bit 1 of the fifth 32-bit word is clear, all others set
    assert int.from_bytes(words[16:20], "little") == 0xFFFFFFFD
    assert words[:16] == b"\xff" * 16 and words[20:] == b"\xff" * 12


# -- the server and the client -------------------------------------------------------------


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    # short: a Unix socket path holds at most 107 bytes, pytest's tmp_path can be longer
    with tempfile.TemporaryDirectory(prefix="btmmctl-", dir="/tmp") as d:
        yield Path(d)


async def _handler(request: Request) -> dict[str, Any]:
    if request.op == Op.STATUS:
        return {"peers": [], "time": 1.0}
    if request.op == Op.PING:
        args = PingArgs.parse(request.args)
        if args.peer == "boom":
            raise RuntimeError("a bug")
        from btmm_core.errors import BtmmError
        raise BtmmError(f"no peer {args.peer!r}", hint="peers: none yet")
    return {"op": str(request.op)}


def _exchange(path: Path, lines: list[bytes]) -> list[dict[str, Any]]:
    """Send ``lines`` on one connection; the replies, until the server closes or all came."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(str(path))
        f = s.makefile("rb")
        out = []
        for line in lines:
            # a server that stops reading (too long a line) may close before all is sent;
            # its reply is in our receive buffer all the same
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                s.sendall(line)
            reply = f.readline()
            if not reply:
                break
            out.append(json.loads(reply))
        return out


def _serve(path: Path, body: Any) -> Any:
    """Run a server on ``path`` while ``body(server)`` runs in a thread."""
    async def main() -> Any:
        server = ControlServer(path, _handler)
        await server.start()
        try:
            return await asyncio.to_thread(body, server)
        finally:
            await server.close()
            assert not path.exists()

    return asyncio.run(main())


def test_server_answers_and_survives_every_kind_of_bad_line(sock_dir: Path) -> None:
    path = sock_dir / "control.sock"

    def body(server: ControlServer) -> None:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        replies = _exchange(path, [
            b'{"v":1,"op":"status"}\n',
            b"not json\n",
            b'{"v":9,"op":"status"}\n',
            b'{"v":1,"op":"fly"}\n',
            b'{"v":1,"op":"ping","args":{"peer":"x"}}\n',
            b'{"v":1,"op":"ping","args":{"peer":"boom"}}\n',
            b'{"v":1,"op":"ping","args":{"count":"many"}}\n',
            b'{"v":1,"op":"status"}\n',  # the same connection still works
        ])
        assert [r["ok"] for r in replies] == [True, False, False, False, False, False, False,
                                              True]
        assert all(r["v"] == 1 for r in replies)
        assert replies[0]["result"] == {"peers": [], "time": 1.0}
        codes = [r["error"]["code"] for r in replies[1:7]]
        assert codes == ["malformed", "unsupported_version", "unknown_op", "failed",
                         "internal", "bad_arguments"]
        assert replies[2]["error"]["versions"] == [1]
        assert replies[4]["error"] == {"code": "failed", "what": "no peer 'x'",
                                       "hint": "peers: none yet"}
        # too long: one error reply, then the connection ends (the rest is unframed)
        replies = _exchange(path, [b'{"v":1,"op":"status","pad":"' + b"a" * 70000 + b'"}\n',
                                   b'{"v":1,"op":"status"}\n'])
        assert [r["error"]["code"] for r in replies] == ["too_long"]
        # and a new connection is served as ever
        assert ask(path, Op.STATUS) == {"peers": [], "time": 1.0}
        assert server.errors == {"malformed": 1, "unsupported_version": 1, "unknown_op": 1,
                                 "failed": 1, "internal": 1, "bad_arguments": 1,
                                 "too_long": 1}

    _serve(path, body)


def test_client_raises_the_error_reply(sock_dir: Path) -> None:
    path = sock_dir / "control.sock"

    def body(_: ControlServer) -> None:
        with pytest.raises(ControlError) as info:
            ask(path, Op.PING, {"peer": "laptop"})
        assert info.value.code == "failed" and info.value.hint == "peers: none yet"
        assert ask(path, Op.HELLO) == {"op": "hello"}

    _serve(path, body)


def test_a_crashed_runs_socket_is_replaced_a_live_one_refused(sock_dir: Path) -> None:
    path = sock_dir / "control.sock"
    left = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    left.bind(str(path))
    left.close()  # bound, never listening: what a SIGKILLed daemon leaves
    with pytest.raises(DaemonNotRunning, match="left from a run"):
        ask(path, Op.STATUS)

    def body(_: ControlServer) -> None:
        with pytest.raises(ConfigError, match="another btmm up answers"):
            claim_path(path)

    _serve(path, body)
    path.write_text("not a socket")
    with pytest.raises(ConfigError, match="is not a socket"):
        claim_path(path)
    with pytest.raises(ConfigError, match="longer than 107"):
        claim_path(sock_dir / ("x" * 120))


def _config(tmp: Path) -> Path:
    (tmp / "state").mkdir(exist_ok=True)
    cfg = tmp / "btmm.toml"
    cfg.write_text(f'[host]\nhost = "laptop"\nstate_dir = "{tmp / "state"}"\n')
    return cfg


@pytest.mark.parametrize(("command", "args"), [(status, []), (status, ["--json"]),
                                               (ping, ["desktop"]), (down, [])])
def test_commands_without_a_daemon_say_so(sock_dir: Path, command: Any,
                                          args: list[str]) -> None:
    result = CliRunner().invoke(command, ["--config", str(_config(sock_dir)), *args])
    assert result.exit_code == 1
    assert "the btmm daemon is not running" in result.output
    assert "what to do: start it with `btmm up`" in result.output
    assert "Traceback" not in result.output


def test_status_and_ping_commands_over_the_socket(sock_dir: Path) -> None:
    cfg = _config(sock_dir)

    def body(_: ControlServer) -> None:
        result = CliRunner().invoke(ping, ["--config", str(cfg), "nobody"])
        assert result.exit_code == 1
        assert "no peer 'nobody'" in result.output and "peers: none yet" in result.output

    _serve(sock_dir / "state" / "control.sock", body)


def _ask_as(uid: int, path: Path) -> bytes:
    """One status request from a child process running as ``uid`` (forked: an interpreter of
    its own may live where that user cannot read); its reply line."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: only system calls, then out
        try:
            os.close(r)
            os.setgid(uid)
            os.setuid(uid)
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(10)
            s.connect(str(path))
            s.sendall(b'{"v":1,"op":"status"}\n')
            os.write(w, s.makefile("rb").readline())
        except BaseException as exc:  # said to the parent, whose json.loads then fails
            os.write(w, repr(exc).encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        line = f.read()
    os.waitpid(pid, 0)
    return line


def test_only_root_is_answered_even_if_the_mode_is_loosened(sock_dir: Path) -> None:
    path = sock_dir / "control.sock"

    def body(_: ControlServer) -> None:
        # what a careless chmod would do: the socket's mode no longer keeps anyone out
        os.chmod(sock_dir, 0o755)
        os.chmod(path, 0o666)
        reply = json.loads(_ask_as(65534, path))
        assert reply["ok"] is False and reply["error"]["code"] == "refused"
        assert reply["error"]["hint"] == "run it with sudo"
        assert "result" not in reply

    _serve(path, body)


def test_connections_beyond_the_limit_are_refused_and_the_rest_served(sock_dir: Path) -> None:
    path = sock_dir / "control.sock"

    def body(server: ControlServer) -> None:
        held = []
        try:
            for _ in range(MAX_CONNECTIONS):
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.settimeout(10)
                s.connect(str(path))
                s.sendall(b'{"v":1,"op":"hello"}\n')
                assert json.loads(s.makefile("rb").readline())["ok"]  # it is being served
                held.append(s)
            with pytest.raises(ControlError, match="too many control connections") as info:
                ask(path, Op.STATUS)
            assert info.value.code == "refused"
            held.pop().close()
            deadline = time.monotonic() + 10
            while True:  # the freed slot is given back once the server saw the close
                try:
                    assert ask(path, Op.STATUS) == {"peers": [], "time": 1.0}
                    break
                except ControlError:
                    assert time.monotonic() < deadline
                    time.sleep(0.05)
        finally:
            for s in held:
                s.close()

    _serve(path, body)
