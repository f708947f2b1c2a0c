"""``btmm join``, ``btmm up``, and ``btmm status``, ``ping`` and ``down`` (which ask the running
daemon over its control socket)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import click

from btmm_core.daemon.config import DEFAULT_CONFIG, load_config, plan_join
from btmm_core.daemon.config import join as do_join
from btmm_core.daemon.control import MAX_PING_COUNT, MAX_PING_TIMEOUT, Op
from btmm_core.daemon.control_client import ask
from btmm_core.errors import BtmmError, ConfigError
from btmm_core.log import LEVELS, configure_logging

_config_option = click.option(
    "-c", "--config", "config_path", type=click.Path(path_type=Path), default=DEFAULT_CONFIG,
    show_default=True, envvar="BTMM_CONFIG", help="Configuration file (TOML).",
)


def _fail(err: BtmmError) -> click.ClickException:
    return click.ClickException(err.what + (f"\n  what to do: {err.hint}" if err.hint else ""))


@click.command("join")
@_config_option
@click.option("--credentials", type=click.Path(path_type=Path, exists=True, dir_okay=False),
              required=True, help="The account's credentials file (`btmm serve user add`) or "
              "an invite (`btmm serve user invite`); only this device's own key is stored.")
@click.option("--secret-file", type=click.Path(path_type=Path, exists=True, dir_okay=False),
              default=None, help="File holding the account secret (else read from stdin).")
@click.option("--name", "host", default=None, help="This host's name (default: hostname).")
@click.option("--replace", is_flag=True,
              help="Re-enrol a device name that is enrolled already (account key only).")
@click.option("--server", default=None, help="Registry HOST:PORT (default: from the "
              "credentials file).")
@click.option("--state-dir", default=None, help="Where keys and state live (/var/lib/btmm).")
@click.option("--dataplane", type=click.Choice(["auto", "fast", "python"]), default=None)
@click.option("--hosts-file", default=None, help="Hosts file to manage ('' for none).")
@click.option("--port", type=int, default=None, help="Tunnel UDP port (4500).")
@click.option("--set", "extra", multiple=True, metavar="KEY=VALUE",
              help="Any other setting, e.g. --set lease=1800 (numbers stay numbers).")
def join(config_path: Path, credentials: Path, secret_file: Path | None, host: str | None,
         replace: bool, server: str | None, state_dir: str | None, dataplane: str | None,
         hosts_file: str | None, port: int | None, extra: tuple[str, ...]) -> None:
    """Join this host to an account: enrol its own key with the registry (the key's secret
    never crosses the network), store it and the account secret (0600) and write the
    configuration."""
    from btmm_core.daemon.enrol import enrol_device, server_from_key_file
    from btmm_core.dns.keyfile import key_file_text, read_key_file

    secret = secret_file.read_bytes() if secret_file else sys.stdin.buffer.read()
    settings: dict[str, Any] = {"server": server, "state_dir": state_dir,
                                "dataplane": dataplane, "hosts_file": hosts_file, "port": port}
    for item in extra:
        k, sep, v = item.partition("=")
        if not sep:
            raise click.UsageError(f"--set {item!r}: expected KEY=VALUE")
        value: Any = v
        for conv in (int, float):
            try:
                value = conv(v)
                break
            except ValueError:
                continue
        settings[k] = value
    try:
        # everything is checked before the registry is asked: an invite is spent by asking
        cfg, _, _ = plan_join(config_path, secret=secret, host=host, settings=settings)
        signer = read_key_file(credentials)
        address = cfg.server_address() or server_from_key_file(signer)
        if address is None:
            raise ConfigError("no registry address: the credentials file names none",
                              hint="pass --server HOST:PORT")
        settings["server"] = f"[{address[0]}]:{address[1]}" if ":" in address[0] \
            else f"{address[0]}:{address[1]}"
        device_key = asyncio.run(enrol_device(address, signer.key, cfg.host, replace=replace))
        text = key_file_text(device_key, user=signer.user,
                             server=f"{address[0]} port {address[1]}")
        cfg = do_join(config_path, credentials=text.encode(), secret=secret,
                      host=host, settings=settings)
    except BtmmError as err:
        raise _fail(err) from err
    except TypeError as err:
        raise click.UsageError(f"unknown setting: {err}") from err
    except OSError as err:
        raise click.ClickException(f"cannot read {credentials}: {err}") from err
    click.echo(f"joined as {cfg.host} (key {device_key.name}); configuration in {config_path}, "
               f"state in {cfg.state_dir}")


@click.command("up")
@_config_option
@click.option("--log-level", type=click.Choice(LEVELS),
              default=None, help="Overrides the configuration's log_level.")
@click.option("--metrics", "metrics_at", metavar="HOST:PORT", default=None,
              help="Serve Prometheus metrics at http://HOST:PORT/metrics (loopback addresses "
              "only; default: off).")
def up(config_path: Path, log_level: str | None, metrics_at: str | None) -> None:
    """Run the host daemon in the foreground until SIGTERM, Ctrl-C or `btmm down` (a clean
    shutdown removes this host's records)."""
    from btmm_core.daemon.host import Daemon
    from btmm_core.metrics.exporter import parse_listen

    try:
        metrics = None if metrics_at is None else parse_listen(metrics_at)
        cfg = load_config(config_path)
        configure_logging(log_level or cfg.log_level)
        daemon = Daemon(cfg)
        daemon.open()
    except BtmmError as err:
        raise _fail(err) from err
    assert daemon.engine is not None

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await daemon.run(stop, metrics)

    try:
        with daemon.engine:
            asyncio.run(main())
    except BtmmError as err:
        raise _fail(err) from err


def _duration(text: str) -> float:
    """"10h", "30m", "1d", "90s" or plain seconds."""
    import re

    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text)
    if m is None or float(m.group(1)) <= 0:
        raise ConfigError(f"{text!r} is not a duration", hint="e.g. 10h, 30m, 1d")
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]


@click.command("ssh-cert")
@_config_option
@click.option("--user", default=None, help="Local user the certificate is for (default: "
              "$SUDO_USER, else the current user); [sso] users gives their principal.")
@click.option("--key", "key_path", type=click.Path(path_type=Path, dir_okay=False),
              default=None, help="Their public key (default: [sso] user_key, "
              "~/.ssh/id_ed25519.pub).")
@click.option("--validity", default=None, help="How long, e.g. 10h (default [sso] "
              "user_validity).")
def ssh_cert(config_path: Path, user: str | None, key_path: Path | None,
             validity: str | None) -> None:
    """Issue an SSH user certificate signed by this device's CA (SSH single sign-on; needs
    read access to the device key, so run it as root). `ssh` picks it up beside the key."""
    import getpass

    from btmm_core.daemon.sso import Sso, user_key_path
    from btmm_core.dns.keyfile import read_key
    from btmm_core.keyex.keys import load_or_create, ula_of

    try:
        cfg = load_config(config_path)
        if not cfg.sso_enabled:
            raise ConfigError("SSH single sign-on is off",
                              hint=f"set enabled = true under [sso] in {config_path}")
        name = user or os.environ.get("SUDO_USER") or getpass.getuser()
        path = key_path or user_key_path(cfg.sso_user_key, name)
        seconds = None if validity is None else _duration(validity)
        static = load_or_create(cfg.key_file)
        sso = Sso(cfg, read_key(cfg.credentials).zone, static.private, static.public,
                  cfg.secret_file.read_bytes().strip(), str(ula_of(static.public)))
        out, info = sso.issue_user(name, path, time.time(), seconds)
    except BtmmError as err:
        raise _fail(err) from err
    except OSError as err:
        raise click.ClickException(f"cannot issue the certificate: {err}") from err
    click.echo(f"{out}: principal {', '.join(info.principals)}, valid until "
               f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(info.valid_before))}")


def _age(v: float | None) -> str:
    return "-" if v is None else f"{v:.0f}s"


def _skew(skew: float) -> str:
    side = "behind" if skew > 0 else "ahead of"
    return (f"this host is {abs(skew):.0f} s {side} the registry: its signed requests are "
            "refused (BADTIME); retrying. Set the clock (`timedatectl set-ntp true`)")


def _bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def _cert_text(c: dict[str, Any] | None) -> str:
    if c is None:
        return "none"
    if not c["valid"]:
        return "EXPIRED" if c["left"] <= 0 else "not yet valid"
    return f"{c['left'] // 3600}h{c['left'] % 3600 // 60:02d}m left"


def _ssh_line(s: dict[str, Any]) -> str:
    users = ", ".join(f"{u} {_cert_text(c)}" for u, c in s["users"].items()) or "none"
    line = (f"ssh       host cert {_cert_text(s['host_cert'])}; user certs: {users}; "
            f"trusts {', '.join(s['trusted'])}")
    if s["revoked"]:
        line += f"; revoked {', '.join(s['revoked'])}"
    return line + (f"  ERROR {s['error']}" if s.get("error") else "")
def _names_lines(names: dict[str, Any] | None) -> list[str]:
    if not names:
        return []
    if not names["listening"]:
        line = "names     no stub resolver" + (f" ({names['error']})" if names["error"] else "")
    else:
        up = ", ".join(names["upstreams"]) or "none (other names REFUSED)"
        line = f"names     stub {names['stub']} via {names['wiring']}; upstream {up}"
    return [line, *([f"          {names['hint']}"] if names.get("hint") else [])]


def render_status(st: dict[str, Any]) -> str:
    h = st["host"]
    lines = [
        f"host      {h['name']}  {h['ula']}",
        f"endpoint  {h['external'] or '-'} (local {h['local_address']}:{h['local_port']}, "
        f"mapping: {h['mapping']}{', ' + h['mapping_error'] if h['mapping_error'] else ''})",
        f"registry  {h['registry']}  lease {h['lease'] or '-'}s, {_age(h['lease_left'])} left;"
        f"  llq {h['llq']}" + (f"  ERROR {h['registry_error']}" if h["registry_error"] else ""),
        *([f"clock     {_skew(h['clock_skew'])}"] if h.get("clock_skew") is not None else []),
        *([f"reflexive {h['reflexive'] or h.get('peer_reflexive') or '-'} (STUN "
           f"{h.get('stun_server') or '-'}" + (f", {h['stun_error']}" if h.get("stun_error")
                                              else "") + ")"] if "reflexive" in h else []),
        # what peers check paths to; per peer only in --json (a wide table)
        *(["candidate " + ", ".join(f"{c['kind']} {c['endpoint']}" for c in h["candidates"])]
          if h.get("candidates") else []),
        *([f"relay     {h['relay']['server']} {h['relay']['state']}, relayed "
           f"{h['relay']['relayed'] or '-'}"] if h.get("relay") else []),
        f"engine    {h['dataplane']}  key {h['public_key']}",
        *([_ssh_line(h["ssh"])] if h.get("ssh") else []),
        *_names_lines(st.get("names")),
        "",
    ]
    cols = ("peer", "ula", "endpoint", "path", "rtt", "answered", "tunnel", "handshake", "rx",
            "tx", "drops")
    rows = [cols]
    whys = []
    for p in st["peers"]:
        drops = sum(p["drops"].values())
        rtt = p.get("rtt_ms")
        path = p.get("path") or "-"
        if path == "relay" and p.get("relay_server"):
            path = f"relay ({p['relay_server']})"
        rows.append((p["name"].rstrip("."), p["ula"], p["endpoint"] or "-", path,
                     "-" if rtt is None else f"{rtt:.1f}ms", _age(p.get("last_answer")),
                     p["tunnel"], _age(p["handshake_age"]), _bytes(p["bytes_in"]),
                     _bytes(p["bytes_out"]), str(drops)))
        if p.get("why"):
            whys.append(f"  {p['name'].rstrip('.')}: {p['tunnel']}: {p['why']}")
    widths = [max(len(r[i]) for r in rows) for i in range(len(cols))]
    for r in rows:
        lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    lines += whys
    if not st["peers"]:
        lines.append("(no peers yet)")
    return "\n".join(lines)


def _ask(config_path: Path, op: Op, args: dict[str, Any] | None = None,
         timeout: float = 5.0) -> dict[str, Any]:
    try:
        cfg = load_config(config_path)
        return ask(cfg.control_path, op, args, timeout)
    except BtmmError as err:
        raise _fail(err) from err


@click.command("status")
@_config_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def status(config_path: Path, as_json: bool) -> None:
    """This host (identity, endpoint, mapping, lease, LLQ) and each peer (tunnel, bytes), as
    the running daemon sees them now."""
    st = _ask(config_path, Op.STATUS)
    click.echo(json.dumps(st, indent=1) if as_json else render_status(st))


def _browser(config_path: Path) -> Any:
    from btmm_core.daemon.browse import Browser

    try:
        return Browser(load_config(config_path))
    except BtmmError as err:
        raise _fail(err) from err


@click.command("browse")
@_config_option
@click.argument("service_type", metavar="[TYPE]", required=False)
@click.option("--watch", is_flag=True, help="Keep following: '+' and '-' lines as instances "
              "come and go (by long-lived query), until Ctrl-C.")
@click.option("--timeout", type=float, default=0.0, help="With --watch: stop after this many "
              "seconds (0: never).")
def browse(config_path: Path, service_type: str | None, watch: bool, timeout: float) -> None:
    """The services of this account's hosts (wide-area DNS-SD, RFC 6763): TYPE is e.g. ssh
    or _smb._tcp; without it every type the zone lists. One line per instance: name,
    host:port, TXT."""
    from btmm_core.names.dnssd import service_type as parse_type

    b = _browser(config_path)
    try:
        stype = parse_type(service_type, b.zone) if service_type else None
    except (BtmmError, ValueError) as err:
        raise click.UsageError(str(err)) from err

    async def main() -> None:
        if not watch:
            for inst in await b.browse(stype):
                click.echo(inst.line(b.zone))
            return
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        until = time.monotonic() + timeout if timeout > 0 else None
        def emit(line: str) -> None:
            click.echo(line)
            sys.stdout.flush()  # a pipe reader sees each change at once

        await b.watch(stype, emit, stop, until)

    try:
        asyncio.run(main())
    except BtmmError as err:
        raise _fail(err) from err


@click.command("resolve")
@_config_option
@click.argument("name")
def resolve(config_path: Path, name: str) -> None:
    """Host, port, addresses and TXT of a service instance NAME (e.g. laptop._ssh._tcp)."""
    from btmm_core.names.dnssd import instance_name

    b = _browser(config_path)
    try:
        qname = instance_name(name, b.zone)
        found = asyncio.run(b.resolve(qname, addresses=True))
    except BtmmError as err:
        raise _fail(err) from err
    if found is None:
        raise click.ClickException(f"no service instance {qname}")
    click.echo(qname.to_text())
    click.echo(f"  host  {found.host or '-'}")
    click.echo(f"  port  {found.port if found.port is not None else '-'}")
    click.echo(f"  addr  {', '.join(found.addresses) or '-'}")
    click.echo(f"  txt   {found.txt or '-'}")


def render_ping(r: dict[str, Any]) -> str:
    path = r.get("path") or "none"
    where = f" {r['path_endpoint']}" if r.get("path_endpoint") else ""
    probe = f", probe rtt {r['path_rtt_ms']:.1f} ms" if r.get("path_rtt_ms") is not None else ""
    lines = [f"PING {r['peer'].rstrip('.')} ({r['ula']}) through the tunnel ({r['tunnel']}); "
             f"path {path}{where}{probe}"]
    got = [t for t in r["rtt_ms"] if t is not None]
    for seq, t in enumerate(r["rtt_ms"], 1):
        lines.append(f"  seq {seq}: " + ("no reply" if t is None else f"{t:.2f} ms"))
    summary = f"{r['sent']} sent, {r['received']} received"
    if got:
        summary += (f", rtt min/avg/max {min(got):.2f}/{sum(got) / len(got):.2f}/"
                    f"{max(got):.2f} ms")
    lines.append(summary)
    return "\n".join(lines)


@click.command("ping")
@_config_option
@click.argument("peer")
@click.option("--count", type=click.IntRange(1, MAX_PING_COUNT), default=3,
              show_default=True, help="Echo requests to send.")
@click.option("-i", "--interval", type=click.FloatRange(0.01, 1.0), default=0.2,
              show_default=True, help="Seconds between requests.")
@click.option("-W", "--timeout", type=click.FloatRange(0.1, MAX_PING_TIMEOUT), default=2.0,
              show_default=True, help="Seconds to wait for replies after the last request.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def ping(config_path: Path, peer: str, count: int, interval: float, timeout: float,
         as_json: bool) -> None:
    """ICMPv6 echo to PEER's address through the tunnel (sent by the daemon), and the path it
    takes. PEER: a host label, a name or a ULA. Exit status 1 when no reply came."""
    args = {"peer": peer, "count": count, "interval": interval, "timeout": timeout}
    r = _ask(config_path, Op.PING, args, timeout=count * interval + timeout + 5.0)
    click.echo(json.dumps(r, indent=1) if as_json else render_ping(r))
    if not r["received"]:
        sys.exit(1)


@click.command("down")
@_config_option
@click.option("--timeout", type=float, default=60.0, show_default=True,
              help="Seconds to wait for the daemon to finish stopping.")
def down(config_path: Path, timeout: float) -> None:
    """Stop the running daemon cleanly: its records are withdrawn from the registry, its
    tunnels, routes and hosts entries removed. Returns once it has stopped."""
    r = _ask(config_path, Op.DOWN, timeout=timeout)
    withdrawn = {True: "its records withdrawn",
                 False: "its records could not be withdrawn (they expire with their lease)",
                 None: "it had published no records"}[r.get("withdrawn")]
    click.echo(f"btmm up stopped: {withdrawn}; {r.get('peers_dropped', 0)} peer(s) dropped"
               + (f"; it had stopped on: {r['error']}" if r.get("error") else ""))
