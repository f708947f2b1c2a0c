"""``btmm serve``: run the registry; ``btmm serve user ...``: manage accounts."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import click
import dns.name
import structlog

from btmm_core.dns.keyfile import key_file_text, write_key_file
from btmm_core.dns.tsig import KeyRole
from btmm_core.errors import BtmmError, ConfigError
from btmm_core.llq.server import LLQConfig
from btmm_core.llq.service import LLQService
from btmm_core.log import configure_logging
from btmm_core.registry.accounts import (
    add_user,
    algorithm_text,
    check_user_free,
    rotate_key,
    write_credentials,
)
from btmm_core.registry.devices import list_devices, make_invite, parse_duration
from btmm_core.registry.handler import Policy, RegistryCore
from btmm_core.registry.limits import UpdateLimits
from btmm_core.registry.server import Listen, RegistryServer
from btmm_core.registry.storage import SqliteStorage
from btmm_core.registry.tls import ensure_self_signed, server_context
from btmm_core.registry.update import NoLeasePolicy
from btmm_core.registry.zones import ZoneConfig, ZoneStore

DEFAULT_STATE = Path("/var/lib/btmm-registry")


def _domain(text: str) -> dns.name.Name:
    try:
        return dns.name.from_text(text)
    except Exception as e:
        raise ConfigError(f"--domain {text!r} is not a domain name: {e}") from e


def _db(state_dir: Path, db: Path | None) -> Path:
    return db if db is not None else state_dir / "registry.sqlite"


def _run(main: Callable[[], Coroutine[Any, Any, None]], event_loop: str) -> None:
    if event_loop == "uvloop":
        try:
            import uvloop
        except ImportError:
            structlog.get_logger("btmm.registry").warning(
                "uvloop is not installed; running on plain asyncio",
            )
        else:
            with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
                runner.run(main())
            return
    asyncio.run(main())


_state_option = click.option(
    "--state-dir",
    type=click.Path(path_type=Path),
    default=DEFAULT_STATE,
    show_default=True,
    envvar="BTMM_REGISTRY_STATE",
    help="Directory for the database, credentials and the self-signed DoT certificate.",
)
_db_option = click.option(
    "--db",
    type=click.Path(path_type=Path),
    default=None,
    help="SQLite file (default: STATE_DIR/registry.sqlite).",
)
_domain_option = click.option(
    "--domain",
    required=True,
    envvar="BTMM_REGISTRY_DOMAIN",
    help="Parent domain, e.g. members.example.",
)


@click.group(invoke_without_command=True)
@_state_option
@_db_option
@_domain_option
@click.option("--listen", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=int, default=53, show_default=True, help="UDP and TCP port.")
@click.option("--tls-port", type=int, default=853, show_default=True, help="DoT port; 0 disables.")
@click.option("--tls-cert", type=click.Path(path_type=Path), default=None)
@click.option("--tls-key", type=click.Path(path_type=Path), default=None)
@click.option("--ns-name", default=None, help="Server's host name (default: ns.DOMAIN).")
@click.option("--ns-address", multiple=True, help="Glue address of the server (repeatable).")
@click.option(
    "--public-port", type=int, default=None, help="Port in the discovery SRVs (default: --port)."
)
@click.option("--lease-min", type=int, default=1800, show_default=True)
@click.option("--lease-max", type=int, default=7200, show_default=True)
@click.option(
    "--no-lease",
    type=click.Choice([p.value for p in NoLeasePolicy]),
    default=NoLeasePolicy.PERMANENT.value,
    show_default=True,
    help="What happens to updates that carry no update-lease option.",
)
@click.option("--default-lease", type=int, default=5400, show_default=True)
@click.option("--fudge", type=int, default=300, show_default=True, help="TSIG fudge, at most 300.")
@click.option(
    "--update-max-rrs",
    type=int,
    default=UpdateLimits.max_rrs,
    show_default=True,
    help="RRs (prerequisites and updates) one UPDATE may carry; REFUSED beyond.",
)
@click.option(
    "--update-key-rate",
    type=float,
    default=UpdateLimits.key_rate,
    show_default=True,
    help="RRs each key may change per second, sustained (0: no limit); REFUSED beyond.",
)
@click.option(
    "--update-key-burst",
    type=int,
    default=UpdateLimits.key_burst,
    show_default=True,
    help="RRs a key may change at once before --update-key-rate applies.",
)
@click.option(
    "--tcp-idle-timeout",
    type=float,
    default=10.0,
    show_default=True,
    help="Seconds a TCP/TLS client may stay silent before it is disconnected.",
)
@click.option("--max-connections", type=int, default=256, show_default=True)
@click.option(
    "--max-connections-per-client",
    type=int,
    default=32,
    show_default=True,
    help="TCP/TLS connections from one address (IPv6: one /64); closed at once beyond.",
)
@click.option("--llq-lease-min", type=int, default=900, show_default=True, help="LLQ lease floor.")
@click.option(
    "--llq-lease-max", type=int, default=7200, show_default=True, help="LLQ lease ceiling."
)
@click.option("--llq-max-total", type=int, default=20000, show_default=True)
@click.option(
    "--llq-max-per-client",
    type=int,
    default=256,
    show_default=True,
    help="LLQs per client address (per /64 for IPv6); SERV-FULL beyond.",
)
@click.option(
    "--llq-max-unacked",
    type=int,
    default=1000,
    show_default=True,
    help="LLQ events outstanding in their first transmission; a burst waits beyond (0: no limit).",
)
@click.option(
    "--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="info"
)
@click.option(
    "--event-loop", type=click.Choice(["uvloop", "asyncio"]), default="uvloop", show_default=True
)
@click.pass_context
def serve(
    ctx: click.Context,
    state_dir: Path,
    db: Path | None,
    domain: str,
    listen: str,
    port: int,
    tls_port: int,
    tls_cert: Path | None,
    tls_key: Path | None,
    ns_name: str | None,
    ns_address: tuple[str, ...],
    public_port: int | None,
    lease_min: int,
    lease_max: int,
    no_lease: str,
    default_lease: int,
    fudge: int,
    update_max_rrs: int,
    update_key_rate: float,
    update_key_burst: int,
    tcp_idle_timeout: float,
    max_connections: int,
    max_connections_per_client: int,
    llq_lease_min: int,
    llq_lease_max: int,
    llq_max_total: int,
    llq_max_per_client: int,
    llq_max_unacked: int,
    log_level: str,
    event_loop: str,
) -> None:
    """Run the registry: authoritative DNS for DOMAIN with TSIG-signed UPDATE and leases."""
    ctx.ensure_object(dict)
    ctx.obj.update(
        state_dir=state_dir,
        db=_db(state_dir, db),
        domain=_domain(domain),
        port=port,
        ns_name=ns_name,
        listen=listen,
    )
    if ctx.invoked_subcommand is not None:
        return
    configure_logging(log_level)
    parent = _domain(domain)
    try:
        policy = Policy(
            fudge=fudge,
            lease_min=lease_min,
            lease_max=lease_max,
            no_lease=NoLeasePolicy(no_lease),
            default_lease=default_lease,
            update_limits=UpdateLimits(update_max_rrs, update_key_rate, update_key_burst),
        )
        llq_config = LLQConfig(
            lease_min=llq_lease_min,
            lease_max=llq_lease_max,
            max_total=llq_max_total,
            max_per_client=llq_max_per_client,
            max_unacked=llq_max_unacked,
            fudge=fudge,
        )
    except ValueError as e:
        raise click.UsageError(str(e)) from e
    ns = dns.name.from_text(ns_name) if ns_name else dns.name.from_text("ns", origin=parent)
    glue = ns_address or ((listen,) if listen not in ("0.0.0.0", "::") else ())
    tls = None
    if tls_port:
        if (tls_cert is None) != (tls_key is None):
            raise click.UsageError("give both --tls-cert and --tls-key, or neither")
        if tls_cert is None or tls_key is None:
            tls_cert, tls_key = ensure_self_signed(state_dir / "tls", ns.to_text(True), list(glue))
        tls = server_context(tls_cert, tls_key)

    async def main() -> None:
        storage = SqliteStorage(_db(state_dir, db))
        for account in storage.accounts():  # made before names were reserved (issue 11 item 7)
            check_user_free(account.user, parent, ns)
        store = ZoneStore(storage, ZoneConfig(parent, ns, tuple(glue), public_port or port))
        core = RegistryCore(store, policy)
        llq = LLQService(core, llq_config)
        server = RegistryServer(
            core,
            Listen(
                listen,
                port,
                tls_port or None,
                tls,
                max_connections=max_connections,
                max_connections_per_client=max_connections_per_client,
                idle_timeout=tcp_idle_timeout,
            ),
        )
        await server.start()
        llq.start(server)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await llq.close()
        await server.close()

    try:
        _run(main, event_loop)
    except BtmmError as e:
        raise click.ClickException(str(e)) from e
    except OSError as e:
        raise click.ClickException(f"cannot listen on {listen} port {port}/{tls_port}: {e}") from e


@serve.group()
def user() -> None:
    """Manage user accounts (one zone and one TSIG key each)."""


def _storage(ctx: click.Context) -> SqliteStorage:
    try:
        return SqliteStorage(ctx.obj["db"])
    except BtmmError as e:
        raise click.ClickException(str(e)) from e


def _ns_name(ctx: click.Context) -> dns.name.Name:
    parent: dns.name.Name = ctx.obj["domain"]
    ns: str | None = ctx.obj["ns_name"]
    return dns.name.from_text(ns) if ns else dns.name.from_text("ns", origin=parent)


def _server_text(ctx: click.Context) -> str:
    parent: dns.name.Name = ctx.obj["domain"]
    ns = ctx.obj["ns_name"] or dns.name.from_text("ns", origin=parent).to_text()
    return f"{ns} port {ctx.obj['port']}"


@user.command("add")
@click.argument("name")
@click.option("--legacy-md5", is_flag=True, help="Make an hmac-md5 key (only for old clients).")
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Credentials file.")
@click.pass_context
def user_add(ctx: click.Context, name: str, legacy_md5: bool, out: Path | None) -> None:
    """Create NAME's zone and TSIG key and write the credentials file for NAME's hosts."""
    storage = _storage(ctx)
    try:
        check_user_free(name, ctx.obj["domain"], _ns_name(ctx))
        account = add_user(storage, name, ctx.obj["domain"], legacy=legacy_md5)
        path = out or ctx.obj["state_dir"] / "credentials" / f"{name}.key"
        write_credentials(path, account, _server_text(ctx))
    except BtmmError as e:
        raise click.ClickException(str(e)) from e
    finally:
        storage.close()
    click.echo(
        f"user {name}: zone {account.zone} key {algorithm_text(account.key)}; credentials in {path}"
    )


@user.command("list")
@click.pass_context
def user_list(ctx: click.Context) -> None:
    """List users, their zones and key algorithms."""
    storage = _storage(ctx)
    try:
        for a in storage.accounts():
            click.echo(f"{a.user}\t{a.zone}\t{algorithm_text(a.key)}")
    finally:
        storage.close()


@user.command("remove")
@click.argument("name")
@click.pass_context
def user_remove(ctx: click.Context, name: str) -> None:
    """Delete NAME's zone, records and key."""
    storage = _storage(ctx)
    try:
        account = storage.remove_account(name)
    except BtmmError as e:
        raise click.ClickException(str(e)) from e
    finally:
        storage.close()
    click.echo(f"user {name} removed (zone {account.zone})")


@user.command("rotate-key")
@click.argument("name")
@click.option("--legacy-md5", is_flag=True, help="Make the new key hmac-md5.")
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Credentials file.")
@click.pass_context
def user_rotate(ctx: click.Context, name: str, legacy_md5: bool, out: Path | None) -> None:
    """Replace NAME's TSIG key; the old key stops working at once."""
    storage = _storage(ctx)
    try:
        account = rotate_key(storage, name, ctx.obj["domain"], legacy=legacy_md5)
        path = out or ctx.obj["state_dir"] / "credentials" / f"{name}.key"
        write_credentials(path, account, _server_text(ctx))
    except BtmmError as e:
        raise click.ClickException(str(e)) from e
    finally:
        storage.close()
    click.echo(f"user {name}: new {algorithm_text(account.key)} key; credentials in {path}")


@user.command("invite")
@click.argument("name")
@click.option("--device", default=None, help="The only device name the invite may enrol.")
@click.option("--expires", "lifetime", default="24h", show_default=True,
              help="How long the invite is valid (e.g. 30m, 24h, 7d).")
@click.option("--out", type=click.Path(path_type=Path), required=True,
              help="Where to write the invite (a key file, 0600).")
@click.pass_context
def user_invite(ctx: click.Context, name: str, device: str | None, lifetime: str,
                out: Path) -> None:
    """Make a single-use invite that lets one new host of NAME enrol (`btmm join`)."""
    storage = _storage(ctx)
    try:
        invite = make_invite(storage, name, device=device, lifetime=parse_duration(lifetime))
        write_key_file(out, key_file_text(invite.key, user=name, server=_server_text(ctx)))
    except BtmmError as e:
        raise click.ClickException(str(e)) from e
    finally:
        storage.close()
    assert invite.key.expires is not None
    until = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(invite.key.expires))
    click.echo(f"invite for {name}" + (f" (device {device})" if device else "")
               + f" valid until {until}, usable once: {out}")


@user.command("devices")
@click.argument("name")
@click.pass_context
def user_devices(ctx: click.Context, name: str) -> None:
    """List NAME's devices (and open invites): device, key name, created."""
    storage = _storage(ctx)
    try:
        entries = list_devices(storage, name)
    except BtmmError as e:
        raise click.ClickException(str(e)) from e
    finally:
        storage.close()
    for d in entries:
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(d.created))
        if d.key.role == KeyRole.DEVICE:
            click.echo(f"{d.device}\t{d.key.name}\tcreated {created}")
        else:
            assert d.key.expires is not None
            until = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(d.key.expires))
            click.echo(f"(invite {d.device or 'any name'})\t{d.key.name}\tcreated {created}"
                       f"\texpires {until}")
    if not entries:
        click.echo(f"user {name} has no devices")


@user.command("revoke")
@click.argument("name")
@click.argument("device")
@click.pass_context
def user_revoke(ctx: click.Context, name: str, device: str) -> None:
    """Cut DEVICE of NAME off: its key stops working and its records are deleted at once."""
    storage = _storage(ctx)
    try:
        entry = storage.remove_device(name, device)
    except BtmmError as e:
        raise click.ClickException(str(e)) from e
    finally:
        storage.close()
    click.echo(f"device {device} of {name} revoked (key {entry.key.name}); its records are "
               "deleted, peers drop it within a second of the registry noticing")
