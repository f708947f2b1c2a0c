"""What ``btmm serve`` runs with: one frozen ``ServeConfig``, grouped by what each part reads.

The registry's own policy (``registry.handler.Policy``: leases, TSIG fudge, update limits) and the
LLQ server's (``llq.server.LLQConfig``) are used as they are; their checks raise ``ValueError``,
which the command line shows as a usage error.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import dns.name

from btmm_core.errors import ConfigError
from btmm_core.llq.server import LLQConfig
from btmm_core.push.server import PushConfig
from btmm_core.registry.handler import Policy
from btmm_core.registry.turncreds import TurnConfig
from btmm_core.registry.zones import ZoneConfig
from btmm_core.stun.turn import split_server

DEFAULT_STATE = Path("/var/lib/btmm-registry")


def parse_domain(text: str) -> dns.name.Name:
    try:
        return dns.name.from_text(text)
    except Exception as e:
        raise ConfigError(f"--domain {text!r} is not a domain name: {e}") from e


def name_server(domain: dns.name.Name, ns_name: str | None) -> dns.name.Name:
    """The server's host name: ``ns_name``, or ns.DOMAIN."""
    return dns.name.from_text(ns_name) if ns_name else dns.name.from_text("ns", origin=domain)


@dataclass(frozen=True)
class StorageConfig:
    #: The database, credentials and the self-signed DoT certificate live here.
    state_dir: Path = DEFAULT_STATE
    db: Path | None = None
    #: ``postgresql://...`` (shared by several servers) or a SQLite file; None: ``db_path``.
    database: str | None = None

    def __post_init__(self) -> None:
        if self.db is not None and self.database is not None:
            raise ValueError("give --database or --db, not both")

    @property
    def db_path(self) -> Path:
        return self.db if self.db is not None else self.state_dir / "registry.sqlite"

    @property
    def target(self) -> str | Path:
        """What ``registry.storage.open_storage`` opens."""
        return self.database if self.database is not None else self.db_path

    @property
    def shown(self) -> str:
        """The database for messages, without a password a URL may carry."""
        if self.database is None:
            return str(self.db_path)
        return re.sub(r"//([^/@:]*):[^/@]*@", r"//\1:***@", self.database)


@dataclass(frozen=True)
class ListenConfig:
    host: str = "127.0.0.1"
    port: int = 53
    #: Seconds a TCP/TLS client may stay silent before it is disconnected.
    idle_timeout: float = 10.0
    max_connections: int = 256
    #: From one address (IPv6: one /64).
    max_connections_per_client: int = 32
    #: Processes serving the same ports (SO_REUSEPORT); more than one needs a database they
    #: can share (PostgreSQL).
    workers: int = 1


@dataclass(frozen=True)
class TlsConfig:
    #: DNS over TLS port; 0 disables it.
    port: int = 853
    #: Both or neither; neither: a self-signed certificate made once in the state directory.
    cert: Path | None = None
    key: Path | None = None

    def __post_init__(self) -> None:
        if self.port and (self.cert is None) != (self.key is None):
            raise ValueError("give both --tls-cert and --tls-key, or neither")


@dataclass(frozen=True)
class ZoneNames:
    """What the server publishes about itself in every zone."""

    domain: dns.name.Name
    ns_name: str | None = None
    #: Glue addresses of the server; none given: the listen address unless it is a wildcard.
    ns_addresses: tuple[str, ...] = ()
    #: Port in the discovery SRVs; None: the listen port.
    public_port: int | None = None
    #: Users whose zones let anyone read their DNS-SD browse records (``--public-browse``).
    public_browse: tuple[str, ...] = ()


@dataclass(frozen=True)
class StunConfig:
    """The STUN responder (``stun/``): on the listen address, answering Binding requests."""

    enabled: bool = True
    port: int = 3478
    #: A second port answering the same; 0: none. A client asking both from one socket sees
    #: whether its NAT maps per destination (``btmm netcheck``).
    alt_port: int = 0

    def __post_init__(self) -> None:
        if self.enabled and not 1 <= self.port <= 65535:
            raise ValueError(f"--stun-port {self.port} is not a port (1..65535)")
        if self.enabled and not 0 <= self.alt_port <= 65535:
            raise ValueError(f"--stun-alt-port {self.alt_port} is not a port (0..65535)")
        if self.enabled and self.alt_port == self.port:
            raise ValueError("--stun-alt-port must differ from --stun-port")

    @property
    def ports(self) -> tuple[int, ...]:
        if not self.enabled:
            return ()
        return (self.port, self.alt_port) if self.alt_port else (self.port,)


@dataclass(frozen=True)
class ServeConfig:
    zone: ZoneNames
    storage: StorageConfig = field(default_factory=StorageConfig)
    listen: ListenConfig = field(default_factory=ListenConfig)
    tls: TlsConfig = field(default_factory=TlsConfig)
    policy: Policy = field(default_factory=Policy)
    llq: LLQConfig = field(default_factory=LLQConfig)
    stun: StunConfig = field(default_factory=StunConfig)
    push: PushConfig = field(default_factory=PushConfig)
    #: DNS Push (RFC 8765) on the DoT port; needs ``tls.port``.
    push_enabled: bool = True
    log_level: str = "info"
    event_loop: str = "uvloop"
    #: updates arriving together share one transaction, where the storage can (SQLite)
    group_commit: bool = True
    #: serve Prometheus metrics at this loopback (host, port); None: off
    metrics: tuple[str, int] | None = None
    #: hand devices TURN credentials for this server (``--turn-server``); None: off
    turn: TurnConfig | None = None

    def __post_init__(self) -> None:
        if self.listen.workers < 1:
            raise ValueError(f"--workers {self.listen.workers}: at least 1")

    @property
    def ns(self) -> dns.name.Name:
        return name_server(self.zone.domain, self.zone.ns_name)

    @property
    def glue(self) -> tuple[str, ...]:
        if self.zone.ns_addresses:
            return self.zone.ns_addresses
        return (self.listen.host,) if self.listen.host not in ("0.0.0.0", "::") else ()

    def zone_config(self) -> ZoneConfig:
        port = self.zone.public_port or self.listen.port
        stun = self.stun.port if self.stun.enabled else None
        push = self.tls.port if self.serves_push else None
        return ZoneConfig(
            self.zone.domain,
            self.ns,
            self.glue,
            port,
            stun_port=stun,
            push_port=push,
            public_browse=frozenset(self.zone.public_browse),
        )

    @property
    def serves_push(self) -> bool:
        return self.push_enabled and bool(self.tls.port)


def turn_config(server: str | None, secret_file: Path | None, lifetime: int) -> TurnConfig | None:
    """``--turn-server HOST[:PORT] --turn-secret-file PATH``: both or neither. The file holds
    the secret coturn has as ``static-auth-secret`` (surrounding white space is dropped)."""
    if server is None and secret_file is None:
        return None
    if server is None or secret_file is None:
        raise ConfigError("--turn-server and --turn-secret-file go together")
    try:
        host, port = split_server(server)
    except ValueError as e:
        raise ConfigError(f"--turn-server {server!r}: {e}") from None
    try:
        secret = secret_file.read_text().strip().encode()
    except OSError as e:
        raise ConfigError(f"--turn-secret-file {secret_file}: {e.strerror}") from None
    if not secret:
        raise ConfigError(f"--turn-secret-file {secret_file} is empty")
    return TurnConfig(host, port, secret, lifetime)
