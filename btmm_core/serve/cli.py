"""``btmm serve``: run the registry (composed in ``compose``); ``btmm serve user ...``: manage
accounts in its database, which also says which domain it serves."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import click
import dns.name

from btmm_core.dns.keyfile import key_file_text, write_key_file
from btmm_core.dns.tsig import KeyRole
from btmm_core.errors import BtmmError
from btmm_core.llq.server import LLQConfig
from btmm_core.log import configure_logging
from btmm_core.metrics.exporter import parse_listen
from btmm_core.push.server import PushConfig
from btmm_core.registry.accounts import (
    add_user,
    algorithm_text,
    check_user_free,
    rotate_key,
    write_credentials,
)
from btmm_core.registry.devices import list_devices, make_invite, parse_duration
from btmm_core.registry.handler import Policy
from btmm_core.registry.limits import UpdateLimits
from btmm_core.registry.storage import Storage, open_storage
from btmm_core.registry.update import NoLeasePolicy
from btmm_core.serve import compose
from btmm_core.serve.config import (
    DEFAULT_STATE,
    ListenConfig,
    ServeConfig,
    StorageConfig,
    StunConfig,
    TlsConfig,
    ZoneNames,
    name_server,
    parse_domain,
    turn_config,
)

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
_database_option = click.option(
    "--database",
    default=None,
    envvar="BTMM_REGISTRY_DATABASE",
    help="postgresql://USER@HOST/DB (one database for several `btmm serve`), or a SQLite file "
    "(default: --db).",
)
_domain_option = click.option(
    "--domain",
    default=None,
    envvar="BTMM_REGISTRY_DOMAIN",
    help="Parent domain, e.g. members.example (needed to serve; the user commands read it "
    "from the database).",
)


@click.group(invoke_without_command=True)
@_state_option
@_db_option
@_database_option
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
@click.option(
    "--public-browse",
    "public_browse",
    multiple=True,
    metavar="USER",
    help="Let anyone read USER's DNS-SD browse records (repeatable; off for every user by "
    "default): the service PTRs, each instance's SRV and TXT, the RFC 6763 section 11 domain "
    "PTRs and the LLQ/DNS Push discovery SRVs answer without a TSIG signature, so unsigned "
    "clients (mDNSResponder's dns-sd, avahi) can browse. Privacy: anyone who knows the zone's "
    "name then sees which services its hosts offer, their host names, ports and TXT; host "
    "addresses, keys and tunnel endpoints stay behind the key.",
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
    "--workers",
    type=int,
    default=1,
    show_default=True,
    help="Processes serving the same ports (SO_REUSEPORT) on one --database (SQLite or "
    "PostgreSQL).",
)
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
    "--stun-port",
    type=int,
    default=3478,
    show_default=True,
    help="UDP port of the STUN responder (Binding requests; on the --listen address).",
)
@click.option(
    "--stun-alt-port",
    type=int,
    default=0,
    show_default=True,
    help="A second STUN port, so that a client can tell whether its NAT maps per destination "
    "(0: none).",
)
@click.option("--no-stun", is_flag=True, help="Answer no STUN and publish no _stun._udp SRV.")
@click.option(
    "--no-push",
    is_flag=True,
    help="Serve no DNS Push (RFC 8765) on the DoT port; publish no _dns-push-tls._tcp SRV.",
)
@click.option(
    "--push-keepalive-max",
    type=float,
    default=3600,
    show_default=True,
    help="Longest DSO keepalive interval granted, seconds (at least 10, RFC 8490 6.5.2); a "
    "session silent for twice the interval granted is closed.",
)
@click.option("--push-max-total", type=int, default=100_000, show_default=True)
@click.option(
    "--push-max-per-client",
    type=int,
    default=20_000,
    show_default=True,
    help="DNS Push subscriptions per client address (per /64 for IPv6); SERVFAIL beyond.",
)
@click.option(
    "--push-max-per-session",
    type=int,
    default=1024,
    show_default=True,
    help="DNS Push subscriptions per DSO session; REFUSED beyond.",
)
@click.option(
    "--no-group-commit",
    is_flag=True,
    help="Commit every update in its own transaction (SQLite: one fsync each) instead of"
    " sharing one among the updates that arrive together.",
)
@click.option(
    "--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="info"
)
@click.option(
    "--event-loop", type=click.Choice(["uvloop", "asyncio"]), default="uvloop", show_default=True
)
@click.option(
    "--turn-server",
    metavar="HOST[:PORT]",
    default=None,
    help="A TURN server (coturn with use-auth-secret) whose time-limited credentials devices "
    "may ask for (a TSIG-signed query with their own key); needs --turn-secret-file.",
)
@click.option(
    "--turn-secret-file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="File holding the TURN server's static-auth-secret (it never leaves this process).",
)
@click.option(
    "--turn-credential-lifetime",
    type=click.IntRange(60, 30 * 86400),
    default=86400,
    show_default=True,
    help="Seconds a TURN credential handed to a device stays valid.",
)
@click.option(
    "--metrics",
    metavar="HOST:PORT",
    default=None,
    help="Serve Prometheus metrics at http://HOST:PORT/metrics (loopback only; default: off).",
)
@click.pass_context
def serve(ctx: click.Context, /, **o: Any) -> None:
    """Run the registry: authoritative DNS for DOMAIN with TSIG-signed UPDATE and leases."""
    ctx.ensure_object(dict)
    try:
        storage = StorageConfig(o["state_dir"], o["db"], o["database"])
    except ValueError as e:
        raise click.UsageError(str(e)) from e
    ctx.obj.update(
        storage=storage,
        domain=o["domain"],
        port=o["port"],
        ns_name=o["ns_name"],
    )
    if ctx.invoked_subcommand is not None:
        return
    if o["domain"] is None:
        param = next(p for p in ctx.command.params if p.name == "domain")
        raise click.MissingParameter(ctx=ctx, param=param)
    try:
        config = _config(o)
    except ValueError as e:
        raise click.UsageError(str(e)) from e
    except BtmmError as e:
        raise click.UsageError(e.what + (f" ({e.hint})" if e.hint else "")) from e
    configure_logging(o["log_level"])
    try:
        if config.listen.workers > 1:
            compose.run_workers(config, lambda: compose.tls_context(config))
        else:
            tls = compose.tls_context(config)
            compose.run(lambda: compose.serve(config, tls), config.event_loop)
    except BtmmError as e:
        raise click.ClickException(str(e)) from e
    except OSError as e:
        stun = "" if o["no_stun"] else f", STUN {o['stun_port']}" + (
            f"/{o['stun_alt_port']}" if o["stun_alt_port"] else "")
        raise click.ClickException(
            f"cannot listen on {o['listen']} port {o['port']}/{o['tls_port']}{stun}: {e}"
        ) from e


def _keepalive_ms(seconds: float) -> int:
    if seconds < 10:
        raise ValueError(f"--push-keepalive-max {seconds:g}: at least 10 s (RFC 8490 6.5.2)")
    return int(seconds * 1000)


def _config(o: dict[str, Any]) -> ServeConfig:
    """The options of ``serve``, by the names click gives them, as a ``ServeConfig``."""
    return ServeConfig(
        zone=ZoneNames(
            parse_domain(o["domain"]),
            o["ns_name"],
            o["ns_address"],
            o["public_port"],
            tuple(o["public_browse"]),
        ),
        storage=StorageConfig(o["state_dir"], o["db"], o["database"]),
        listen=ListenConfig(
            o["listen"],
            o["port"],
            o["tcp_idle_timeout"],
            o["max_connections"],
            o["max_connections_per_client"],
            o["workers"],
        ),
        tls=TlsConfig(o["tls_port"], o["tls_cert"], o["tls_key"]),
        policy=Policy(
            fudge=o["fudge"],
            lease_min=o["lease_min"],
            lease_max=o["lease_max"],
            no_lease=NoLeasePolicy(o["no_lease"]),
            default_lease=o["default_lease"],
            update_limits=UpdateLimits(
                o["update_max_rrs"], o["update_key_rate"], o["update_key_burst"]
            ),
        ),
        llq=LLQConfig(
            lease_min=o["llq_lease_min"],
            lease_max=o["llq_lease_max"],
            max_total=o["llq_max_total"],
            max_per_client=o["llq_max_per_client"],
            max_unacked=o["llq_max_unacked"],
            fudge=o["fudge"],
        ),
        stun=StunConfig(not o["no_stun"], o["stun_port"], o["stun_alt_port"]),
        push=PushConfig(
            keepalive_max_ms=_keepalive_ms(o["push_keepalive_max"]),
            max_per_session=o["push_max_per_session"],
            max_per_client=o["push_max_per_client"],
            max_total=o["push_max_total"],
        ),
        push_enabled=not o["no_push"],
        log_level=o["log_level"],
        event_loop=o["event_loop"],
        group_commit=not o.get("no_group_commit", False),
        metrics=None if o.get("metrics") is None else parse_listen(o["metrics"]),
        turn=turn_config(o.get("turn_server"), o.get("turn_secret_file"),
                         o.get("turn_credential_lifetime", 86400)),
    )


@serve.group()
def user() -> None:
    """Manage user accounts (one zone and one TSIG key each)."""


def _open(ctx: click.Context) -> tuple[Storage, dns.name.Name | None]:
    """The database and the domain it serves; an explicit --domain must be that domain."""
    path = ctx.obj["storage"].shown
    try:
        storage = open_storage(ctx.obj["storage"].target)
        stored = storage.domain()
        given = parse_domain(ctx.obj["domain"]) if ctx.obj["domain"] else None
    except BtmmError as e:
        raise click.ClickException(str(e)) from e
    if given is not None and stored is not None and given != stored:
        storage.close()
        raise click.ClickException(
            f"--domain {given} disagrees with {path}, which serves {stored}: leave --domain "
            "out, or give the --state-dir/--db of that domain's registry"
        )
    if stored is None and given is not None:
        storage.ensure_zone(given, None)  # later commands read it from here
    return storage, stored or given


def _storage(ctx: click.Context) -> Storage:
    return _open(ctx)[0]


def _storage_and_domain(ctx: click.Context) -> tuple[Storage, dns.name.Name]:
    storage, domain = _open(ctx)
    if domain is None:
        storage.close()
        raise click.ClickException(
            f"{ctx.obj['storage'].shown} has no domain yet: pass --domain (e.g. `btmm serve "
            "--domain members.example user add NAME`) once, or start `btmm serve --domain` on it"
        )
    ctx.obj["parent"] = domain
    return storage, domain


def _server_text(ctx: click.Context) -> str:
    ns = ctx.obj["ns_name"] or name_server(ctx.obj["parent"], None).to_text()
    return f"{ns} port {ctx.obj['port']}"


@user.command("add")
@click.argument("name")
@click.option("--legacy-md5", is_flag=True, help="Make an hmac-md5 key (only for old clients).")
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Credentials file.")
@click.pass_context
def user_add(ctx: click.Context, name: str, legacy_md5: bool, out: Path | None) -> None:
    """Create NAME's zone and TSIG key and write the credentials file for NAME's hosts."""
    storage, domain = _storage_and_domain(ctx)
    try:
        check_user_free(name, domain, name_server(domain, ctx.obj["ns_name"]))
        account = add_user(storage, name, domain, legacy=legacy_md5)
        path = out or ctx.obj["storage"].state_dir / "credentials" / f"{name}.key"
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
    storage, domain = _storage_and_domain(ctx)
    try:
        account = rotate_key(storage, name, domain, legacy=legacy_md5)
        path = out or ctx.obj["storage"].state_dir / "credentials" / f"{name}.key"
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
    storage, _ = _storage_and_domain(ctx)
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
               "deleted, peers drop it within a second of the registry noticing; its SSH CA "
               "(if it published one) is listed at _btmm-revoked for the hosts' KRL")


@serve.group()
def db() -> None:
    """The registry's database: its schema version and upgrades."""


@db.command("upgrade")
@click.pass_context
def db_upgrade(ctx: click.Context) -> None:
    """Bring the database's schema to this btmm's version (also done at every start)."""
    config = ctx.obj["storage"]
    try:
        storage = open_storage(config.target)  # applies what is missing
        version = storage.schema_version()
    except BtmmError as e:
        raise click.ClickException(str(e)) from e
    storage.close()
    click.echo(f"{config.shown}: schema version {version}")
