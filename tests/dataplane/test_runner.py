"""`btmm tunnel`: configuration checks (sans-I/O), and its clear refusals as a real process
(bad key length, UDP port in use, no permission for the TUN device) for both engines."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from e2e_helpers import REPO, LineReader, Tunnel, env, pair_configs, two_hosts, wait_for

from btmm_core.dataplane.api import Endpoint
from btmm_core.dataplane.cli import parse_config, parse_endpoint
from btmm_core.errors import ConfigError
from btmm_core.lab.netns import Lab

GOOD: dict[str, Any] = {
    "dataplane": "python",
    "tun": "btmm7",
    "mtu": 1420,
    "address": "fd00:b7:1::1/64",
    "listen_port": 4500,
    "peers": [
        {
            "inner": "fd00:b7:1::2",
            "endpoint": "192.0.2.2:4500",
            "tx_spi": 0x1001,
            "tx_key": "11" * 36,
            "rx_spi": 0x1002,
            "rx_key": "22" * 36,
        }
    ],
}


def _with_peer(**changes: Any) -> dict[str, Any]:
    return {**GOOD, "peers": [{**GOOD["peers"][0], **changes}]}


def test_parse_good_config() -> None:
    cfg = parse_config(GOOD)
    assert cfg.tun == "btmm7" and cfg.mtu == 1420 and cfg.listen == Endpoint("::", 4500)
    assert str(cfg.address) == "fd00:b7:1::1/64"
    (peer,) = cfg.peers
    assert peer.endpoint == Endpoint("192.0.2.2", 4500)
    assert peer.tx_key == b"\x11" * 36 and peer.rx_spi == 0x1002


def test_peer_without_sas_or_endpoint() -> None:
    cfg = parse_config({**GOOD, "peers": [{"inner": "fd00:b7:1::4", "endpoint": None}]})
    (peer,) = cfg.peers
    assert peer.endpoint is None and peer.tx_spi is None and peer.rx_key is None


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (_with_peer(tx_key="11" * 35), "tx_key is 35 bytes long, not 36"),
        (_with_peer(rx_key="zz" * 36), "rx_key is not hexadecimal"),
        (_with_peer(tx_spi=0), "tx_spi 0 is out of range"),
        (_with_peer(rx_spi=None), "only one of rx_spi and rx_key"),
        (_with_peer(endpoint="192.0.2.2"), "is not host:port"),
        (_with_peer(endpoint="2001:db8::1:4500"), "is not an IPv4 address or a bracketed"),
        (_with_peer(endpoint="[192.0.2.2]:4500"), "is not an IPv4 address or a bracketed"),
        (_with_peer(inner="fd00:b7:1::zz"), "is not an IPv6 address"),
        ({**GOOD, "mtu": 1000}, "mtu 1000 is invalid"),
        ({**GOOD, "address": "192.0.2.1/24"}, "is not an IPv6 address"),
        ({**GOOD, "listen_port": 70000}, "listen_port 70000 is invalid"),
        ({**GOOD, "peer": []}, "unknown configuration keys ['peer']"),
        ({**GOOD, "peers": [GOOD["peers"][0], GOOD["peers"][0]]}, "appears twice"),
    ],
)
def test_config_errors_name_the_field(raw: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(raw)
    assert message in str(info.value)


def test_parse_endpoint() -> None:
    assert parse_endpoint("198.51.100.7:1") == Endpoint("198.51.100.7", 1)
    assert parse_endpoint("[2001:DB8:0::7]:4500") == Endpoint("2001:db8::7", 4500)
    # v4-mapped is the IPv4 endpoint, as engines report it
    assert parse_endpoint("[::ffff:198.51.100.7]:9") == Endpoint("198.51.100.7", 9)
    assert str(Endpoint("2001:db8::7", 4500)) == "[2001:db8::7]:4500"
    with pytest.raises(ConfigError):
        parse_endpoint("[fe80::1%eth0]:4500")
    with pytest.raises(ConfigError, match="out of range"):
        parse_endpoint("198.51.100.7:0")


def _run_tunnel(
    cfg: dict[str, Any], tmp_path: Path, argv_prefix: list[str]
) -> tuple[int, dict[str, Any], str]:
    path = tmp_path / "tunnel.json"
    path.write_text(json.dumps(cfg))
    proc = subprocess.run(
        [*argv_prefix, sys.executable, "-m", "btmm_core.cli", "tunnel", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env(),
        cwd=str(REPO),
        input="",
    )
    first = proc.stdout.splitlines()[0] if proc.stdout else "{}"
    return proc.returncode, json.loads(first), proc.stderr


def test_bad_key_length_is_refused_before_anything_opens(tmp_path: Path) -> None:
    code, ready, log = _run_tunnel(_with_peer(rx_key="ab" * 32), tmp_path, [])
    assert code == 1
    assert ready["ready"] is False
    assert "rx_key is 32 bytes long, not 36" in ready["error"]
    assert "72 hex digits" in log


@pytest.mark.netns
@pytest.mark.parametrize("kind", ["fast", "python"])
def test_port_in_use(kind: str, tmp_path: Path) -> None:
    with Lab() as lab:
        a, _ = two_hosts(lab)
        ca, _ = pair_configs(kind, kind)
        first = Tunnel("first", a, kind, ca, tmp_path)
        first.start()
        second = {**ca, "tun": "btmm1", "dataplane": kind}
        code, ready, log = _run_tunnel(second, tmp_path, a.argv([]))
        assert code == 1, log
        assert ready["ready"] is False
        assert "4500" in ready["error"] and "in use" in ready["error"].lower(), ready
        # The refused second tunnel left the first one working.
        first.assert_alive()
        assert first.stop() == 0


@pytest.mark.netns
@pytest.mark.parametrize("kind", ["fast", "python"])
def test_no_permission_for_the_tun_device(kind: str, tmp_path: Path) -> None:
    with Lab() as lab:
        a, _ = two_hosts(lab)
        ca, _ = pair_configs(kind, kind)
        # root without CAP_NET_ADMIN: creating a TUN device is refused (EPERM).
        drop = ["setpriv", "--bounding-set=-net_admin", "--inh-caps=-net_admin", "--"]
        code, ready, log = _run_tunnel({**ca, "dataplane": kind}, tmp_path, a.argv(drop))
        assert code == 1, log
        assert ready["ready"] is False
        assert "CAP_NET_ADMIN" in ready["error"] or "root" in ready["error"], ready
        assert "Traceback" not in log, log


def _unix_request(path: Path, *requests: dict[str, Any]) -> list[dict[str, Any]]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(str(path))
        f = s.makefile("rw")
        answers = []
        for r in requests:
            f.write(json.dumps(r) + "\n")
            f.flush()
            answers.append(json.loads(f.readline()))
        return answers


@pytest.mark.netns
@pytest.mark.parametrize("kind", ["fast", "python"])
def test_unix_control_socket_and_sigterm(kind: str, tmp_path: Path) -> None:
    with Lab() as lab:
        a, _ = two_hosts(lab)
        ca, _ = pair_configs(kind, kind)
        cfg = tmp_path / "a.json"
        cfg.write_text(json.dumps({**ca, "dataplane": kind}))
        sock = tmp_path / "ctl.sock"
        log = tmp_path / "a.log"
        proc = a.popen(
            [
                sys.executable,
                "-m",
                "btmm_core.cli",
                "tunnel",
                str(cfg),
                "--control",
                f"unix:{sock}",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=log.open("w"),
            text=True,
            env=env(),
            cwd=str(REPO),
        )
        ready = json.loads(LineReader(proc.stdout).get(30, "the ready line"))
        assert ready["ready"] is True and ready["port"] == 4500, (ready, log.read_text())
        wait_for(sock.exists, 10, "the control socket")
        # stdin is /dev/null (at its end at once): with a unix control socket that must not stop it.
        counters, peers, bad, unknown, nobody = _unix_request(
            sock,
            {"cmd": "counters", "id": 1},
            {"cmd": "peers"},
            {"cmd": "update_peer", "inner": "fd00:b7:1::2", "endpoint": "192.0.2.2"},
            {"cmd": "bogus"},
            {"cmd": "update_peer", "inner": "fd00:b7:1::99", "endpoint": None},
        )
        assert counters["ok"] is True and counters["id"] == 1
        assert counters["counters"]["packets_in"] == 0
        assert [p["inner"] for p in peers["peers"]] == ["fd00:b7:1::2"]
        assert peers["peers"][0]["endpoint"] == "192.0.2.2:4500"
        assert bad["ok"] is False and "host:port" in bad["error"]
        assert unknown["ok"] is False and "unknown cmd" in unknown["error"]
        assert nobody["ok"] is False and "fd00:b7:1::99" in nobody["error"], nobody
        (moved,) = _unix_request(
            sock, {"cmd": "update_peer", "inner": "fd00:b7:1::2", "endpoint": "198.51.100.9:4501"}
        )
        assert moved["ok"] is True
        (peers,) = _unix_request(sock, {"cmd": "peers"})
        assert peers["peers"][0]["endpoint"] == "198.51.100.9:4501"
        assert proc.poll() is None, log.read_text()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0, log.read_text()
        text = log.read_text()
        assert "stopping" in text and "Traceback" not in text, text
        assert not sock.exists(), "the control socket was left behind"


@pytest.mark.netns
@pytest.mark.parametrize("kind", ["fast", "python"])
def test_unusable_control_socket_is_refused(kind: str, tmp_path: Path) -> None:
    with Lab() as lab:
        a, _ = two_hosts(lab)
        ca, _ = pair_configs(kind, kind)
        cfg = tmp_path / "a.json"
        cfg.write_text(json.dumps({**ca, "dataplane": kind}))
        bad = tmp_path / "no-such-dir" / "ctl.sock"
        proc = a.run(
            [sys.executable, "-m", "btmm_core.cli", "tunnel", str(cfg), "--control", f"unix:{bad}"],
            check=False,
            input="",
            timeout=90,
        )
        assert proc.returncode == 1, proc.stderr
        ready = json.loads(proc.stdout.splitlines()[0])
        assert ready["ready"] is False and str(bad) in ready["error"], ready
        assert "Traceback" not in proc.stderr, proc.stderr
