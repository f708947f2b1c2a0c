"""``btmm join``, ``btmm up``, and ``btmm status``, ``ping`` and ``down`` (which ask the running
daemon over its control socket)."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
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
        f"engine    {h['dataplane']}  key {h['public_key']}",
        "",
    ]
    cols = ("peer", "ula", "endpoint", "path", "rtt", "answered", "tunnel", "handshake", "rx",
            "tx", "drops")
    rows = [cols]
    whys = []
    for p in st["peers"]:
        drops = sum(p["drops"].values())
        rtt = p.get("rtt_ms")
        rows.append((p["name"].rstrip("."), p["ula"], p["endpoint"] or "-", p.get("path") or "-",
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
