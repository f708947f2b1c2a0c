"""The daemon's configuration: a TOML file with sane defaults, and ``btmm join``'s state.

Every key is optional except the account and host name that ``btmm join`` writes. Paths that
hold secrets (this device's TSIG key file, account secret, device key) are created 0600 in a
0700 directory.
"""

from __future__ import annotations

import os
import re
import socket
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from btmm_core.daemon.ondemand import OnDemandConfig
from btmm_core.dataplane.api import DEFAULT_MTU
from btmm_core.dns.keyfile import write_secret
from btmm_core.errors import ConfigError
from btmm_core.names.dnssd import ServiceSpec, parse_services
from btmm_core.names.system import parse_stub, parse_upstreams

DEFAULT_CONFIG = Path(os.environ.get("BTMM_CONFIG", "/etc/btmm/btmm.toml"))
DEFAULT_STATE = Path("/var/lib/btmm")
_HOST_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")


@dataclass(frozen=True)
class Config:
    path: Path
    host: str
    state_dir: Path = DEFAULT_STATE
    #: "HOST:PORT" of the registry; empty: look up ``_dns-update._udp.<zone>`` SRV
    server: str = ""
    #: no longer used (the address is derived from the device key); kept so that old
    #: configurations load, with a warning from the daemon
    interface_id: str = ""
    dataplane: str = "auto"
    tun: str = "btmm0"
    port: int = 4500
    #: the TUN MTU: fits a 1500-byte path over an IPv4 or an IPv6 underlay
    mtu: int = DEFAULT_MTU
    #: update lease asked for (RFC 9664); the registry clamps it to its bounds
    lease: int = 5400
    #: fraction of the granted lease after which records are refreshed (plus jitter)
    refresh_fraction: float = 0.8
    llq_lease: int = 3600
    #: seconds between checks of each peer's candidate SRV (one signed query; a change, or no
    #: candidate SRV, reads all its records). LLQ events come in between, but over UDP through
    #: a NAT they stop silently when the NAT changes its mapping
    resolve_interval: float = 30.0
    #: seconds between full reads of each peer's records (address, key, endpoint, candidates)
    #: whatever the checks found, in a round that saw the zone's serial move: the safety net
    #: for a new key or ULA, which no LLQ follows
    reread_interval: float = 300.0
    #: seconds between checks of addresses and routes when netlink reports nothing
    netcheck_interval: float = 5.0
    keepalive: float = 20.0
    #: [tunnel] seconds without a packet after which a peer's tunnel closes; the next packet
    #: opens it again (``daemon/ondemand.py``). 0: every tunnel is always on
    idle_timeout: float = 300.0
    #: [tunnel] seconds an on-demand opening may take before the held packets are answered
    #: with ICMPv6 unreachable
    connect_timeout: float = 15.0
    #: "auto": map a port when our address is private; "off": publish our own address
    portmap: str = "auto"
    #: override the port mapping gateway (default: the IPv4 default route)
    gateway: str = ""
    hosts_file: Path | None = Path("/etc/hosts")
    log_level: str = "info"
    #: [sso]: SSH single sign-on (docs/architecture.md section 12); off unless enabled
    sso_enabled: bool = False
    #: local user -> the principal their certificates carry (and that may log in as them)
    sso_users: dict[str, str] = field(default_factory=dict)
    #: the public half of the sshd host key the host certificate is for
    sso_host_key: Path = Path("/etc/ssh/ssh_host_ed25519_key.pub")
    #: each user's public key for automatic certificates (``~`` is the user's home)
    sso_user_key: str = "~/.ssh/id_ed25519.pub"
    sso_sshd_dropin: Path = Path("/etc/ssh/sshd_config.d/btmm.conf")
    sso_known_hosts: Path = Path("/etc/ssh/ssh_known_hosts")
    #: the running sshd's pid file: it gets SIGHUP when the drop-in or host certificate change
    sso_sshd_pid_file: Path = Path("/run/sshd.pid")
    sso_host_validity: float = 4 * 3600.0
    sso_user_validity: float = 10 * 3600.0
    #: the stub resolver's loopback ADDR:PORT ("": none); names/system.py says why this one
    stub: str = "127.0.0.153:53"
    #: resolvers for names outside the zone: "ADDR[:PORT], ..."; "": the nameservers of
    #: ``resolv_conf`` as the daemon starts; "none": REFUSED
    upstream: str = ""
    resolv_conf: Path = Path("/etc/resolv.conf")
    #: ``[services]``: what this host publishes by wide-area DNS-SD (``names/dnssd.py``)
    services: tuple[ServiceSpec, ...] = ()
    #: where ``btmm up`` listens for ``btmm status``, ``ping`` and ``down`` (a Unix socket,
    #: 0600); empty: ``control.sock`` in the state directory
    control_socket: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def credentials(self) -> Path:
        return self.state_dir / "credentials.key"

    @property
    def secret_file(self) -> Path:
        return self.state_dir / "account.secret"

    @property
    def key_file(self) -> Path:
        return self.state_dir / "device.key"

    @property
    def identity_file(self) -> Path:
        return self.state_dir / "identity.json"

    @property
    def control_path(self) -> Path:
        return self.control_socket or self.state_dir / "control.sock"

    @property
    def legacy_status_file(self) -> Path:
        """Where versions before the control socket wrote their status every second."""
        return self.state_dir / "status.json"

    def server_address(self) -> tuple[str, int] | None:
        if not self.server:
            return None
        host, sep, port = self.server.rpartition(":")
        if not sep or not port.isdigit():
            raise ConfigError(f"server {self.server!r} is not HOST:PORT", hint="e.g. 192.0.2.53:53")
        return host.strip("[]"), int(port)


_SECTIONS: dict[str, tuple[str, ...]] = {
    "host": ("host", "state_dir", "interface_id", "hosts_file", "log_level", "control_socket"),
    "registry": ("server", "lease", "refresh_fraction", "llq_lease", "resolve_interval",
                 "reread_interval"),
    "tunnel": ("dataplane", "tun", "port", "mtu", "keepalive", "idle_timeout",
               "connect_timeout"),
    "network": ("portmap", "gateway", "netcheck_interval"),
    "names": ("stub", "upstream", "resolv_conf"),
}
#: [sso] keys; each is the field ``sso_<key>``
_SSO_KEYS = ("enabled", "users", "host_key", "user_key", "sshd_dropin", "known_hosts",
             "sshd_pid_file", "host_validity", "user_validity")


def load_config(path: Path) -> Config:
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError as exc:
        raise ConfigError(f"no configuration at {path}",
                          hint="run `btmm join` first, or pass --config") from exc
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from exc
    known = {f.name: f for f in fields(Config)}
    values: dict[str, Any] = {}
    services = data.get("services", {})
    if not isinstance(services, dict):
        raise ConfigError(f"{path}: [services] must be a table", hint="e.g. ssh = 22")
    values["services"] = parse_services(services)
    for section, keys in _SECTIONS.items():
        table = data.get(section, {})
        if not isinstance(table, dict):
            raise ConfigError(f"{path}: [{section}] must be a table")
        for k, v in table.items():
            if k not in keys:
                raise ConfigError(f"{path}: unknown key {k!r} in [{section}]",
                                  hint=f"known keys: {', '.join(keys)}")
            values[k] = v
    sso = data.get("sso", {})
    if not isinstance(sso, dict):
        raise ConfigError(f"{path}: [sso] must be a table")
    for k, v in sso.items():
        if k not in _SSO_KEYS:
            raise ConfigError(f"{path}: unknown key {k!r} in [sso]",
                              hint=f"known keys: {', '.join(_SSO_KEYS)}")
        values[f"sso_{k}"] = v
    _check_sso(path, values)
    if "host" not in values:
        raise ConfigError(f"{path}: [host] host is missing", hint="run `btmm join`")
    for k in ("state_dir", "hosts_file", "resolv_conf", "control_socket"):
        if k in values:
            values[k] = Path(values[k]) if values[k] else None
    for k in ("state_dir", "resolv_conf"):
        if values.get(k) is None:
            values.pop(k, None)
    for k, v in values.items():
        want = known[k].type
        if want in ("int", "float") and not isinstance(v, (int, float)):
            raise ConfigError(f"{path}: {k} must be a number, not {v!r}")
    cfg = Config(path=path, **values)
    validate(cfg)
    return cfg


def _check_sso(path: Path, values: dict[str, Any]) -> None:
    from btmm_core.sso.files import principal_problem, user_problem

    if not isinstance(values.get("sso_enabled", False), bool):
        raise ConfigError(f"{path}: [sso] enabled must be true or false")
    users = values.get("sso_users", {})
    if not isinstance(users, dict):
        raise ConfigError(f"{path}: [sso] users must be a table",
                          hint='e.g. users = {"alice" = "alice"}')
    for user, principal in users.items():
        problem = user_problem(user) or (principal_problem(principal)
                                         if isinstance(principal, str) else "not a string")
        if problem is not None:
            raise ConfigError(f"{path}: [sso] users: {user!r} = {principal!r}: {problem}")
    for k in ("sso_host_key", "sso_sshd_dropin", "sso_known_hosts", "sso_sshd_pid_file"):
        if k in values:
            if not isinstance(values[k], str) or not values[k]:
                raise ConfigError(f"{path}: [sso] {k[4:]} must be a path")
            values[k] = Path(values[k])
    for k in ("sso_host_validity", "sso_user_validity"):
        v = values.get(k, 3600.0)
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not 600 <= v <= 7 * 86400:
            raise ConfigError(f"{path}: [sso] {k[4:]} must be seconds between 600 and 604800",
                              hint="certificates are renewed by a check once a minute")


def validate(cfg: Config) -> None:
    if not _HOST_RE.match(cfg.host):
        raise ConfigError(f"host name {cfg.host!r} is not a DNS label",
                          hint="lower-case letters, digits and '-', at most 63")
    if cfg.portmap not in ("auto", "off"):
        raise ConfigError(f"portmap = {cfg.portmap!r}: use \"auto\" or \"off\"")
    OnDemandConfig(float(cfg.idle_timeout), float(cfg.connect_timeout))  # raises ConfigError
    if not 0.1 <= cfg.refresh_fraction <= 0.95:
        raise ConfigError("refresh_fraction must be between 0.1 and 0.95")
    if not 0 < cfg.resolve_interval <= cfg.reread_interval:
        raise ConfigError(
            f"resolve_interval = {cfg.resolve_interval:g} and reread_interval = "
            f"{cfg.reread_interval:g}: both must be positive, resolve_interval the shorter",
            hint="defaults: resolve_interval = 30, reread_interval = 300")
    if cfg.stub:
        parse_stub(cfg.stub)
        if cfg.upstream.strip() != "none":
            parse_upstreams(cfg.upstream)
    cfg.server_address()


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'


def plan_join(
    config_path: Path,
    *,
    secret: bytes,
    host: str | None,
    settings: dict[str, Any],
) -> tuple[Config, dict[str, Any], bytes]:
    """Check what ``join`` will write (before anything is asked of the registry)."""
    from btmm_core.keyex.keys import MIN_SECRET_LEN

    secret = secret.strip()
    if len(secret) < MIN_SECRET_LEN:
        raise ConfigError(f"the account secret is {len(secret)} bytes; at least "
                          f"{MIN_SECRET_LEN} are needed",
                          hint="use the same secret on all your hosts, e.g. from "
                          "`head -c 32 /dev/urandom | base64`")
    name = (host or socket.gethostname().split(".")[0]).lower()
    values: dict[str, Any] = {"host": name, **{k: v for k, v in settings.items() if v is not None}}
    state_dir = Path(values.get("state_dir", DEFAULT_STATE))
    values["state_dir"] = str(state_dir)
    rest: dict[str, Any] = {k: (Path(v) if k in ("hosts_file", "control_socket") and v else v)
                            for k, v in values.items() if k not in ("host", "state_dir")}
    if rest.get("hosts_file") == "":
        rest["hosts_file"] = None
    cfg = Config(path=config_path, host=name, state_dir=state_dir, **rest)
    validate(cfg)
    return cfg, values, secret


def join(
    config_path: Path,
    *,
    credentials: bytes,
    secret: bytes,
    host: str | None,
    settings: dict[str, Any],
) -> Config:
    """Store this device's key file and the account secret (0600) and write the configuration.

    ``credentials`` is the device's own key file (``btmm join`` gets it by enrolment); the
    account key never goes onto the device.
    """
    cfg, values, secret = plan_join(config_path, secret=secret, host=host, settings=settings)
    if b"key " not in credentials or b"secret" not in credentials:
        raise ConfigError("the credentials file holds no key statement",
                          hint="use the file `btmm serve user add` wrote")
    write_secret(cfg.credentials, credentials, private_dir=True)
    write_secret(cfg.secret_file, secret, private_dir=True)
    lines = ["# btmm host daemon configuration (written by `btmm join`)"]
    for section, keys in _SECTIONS.items():
        present = [k for k in keys if k in values]
        if present:
            lines.append(f"\n[{section}]")
            lines += [f"{k} = {_toml_value(values[k])}" for k in present]
    config_path.parent.mkdir(parents=True, exist_ok=True)
    config_path.write_text("\n".join(lines) + "\n")
    return load_config(config_path)
