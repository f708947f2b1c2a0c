"""Soak and chaos: a lab of four hosts and the registry under churn, with checksummed streams
between every pair of hosts the whole time (issue 19).

    python3 -m bench.soak --minutes 60 [--interval 30] [--json /tmp/soak.json]

The world (real ``btmm serve``, ``btmm join``, ``btmm up``, miniupnpd, nftables NAT, all in
network namespaces this run creates and removes):

    desktop (fast engine) and nas (python engine) behind gw1,
    laptop (fast) and phone (python) behind gw2, gw3 a cafe the laptop roams into,
    5 % of the packets through gw2's uplink dropped, both ways (nftables ``numgen``).

Every pair of hosts runs one stream: back-to-back TCP transfers by name through the tunnel,
alternating direction, each at a bounded rate and checked end to end by SHA-256. Meanwhile,
every ``--interval`` seconds the laptop roams (gw2 <-> gw3), and half-way between two roams one
fault in turn: gw1 reboots (miniupnpd loses its mappings, connection tracking flushed), the
registry is SIGKILLed and restarted, the nas's daemon is SIGKILLed and restarted. After each
roam or fault the run measures the time until everything is back: every host has a tunnel up
(its path answering) to every other, and the registry answers.

The report: transfers completed, bytes moved, transfers that came back with other bytes
(corrupted: must be 0), transfers cut (allowed only when one end's daemon was killed while it
ran; any other cut is a failure), the recovery time after each event, RSS, open file
descriptors and threads of every daemon and of the registry at the start and at the end, and
the records left in the zone after every daemon has shut down cleanly (must be none).

Not simulated: clock steps on one host. Linux time namespaces offset only the monotonic and
boot-time clocks, not the wall clock, so one namespace's wall clock cannot be stepped without
stepping the machine's; that fault needs a virtual machine per host.

Exit status 0 when nothing was corrupted, no stream was cut without a kill, every event
recovered and no record was left; 1 otherwise. Needs root.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import dns.name

from btmm_core.lab.netns import Lab, LabError
from btmm_core.lab.world import (
    CAFE,
    DOMAIN,
    GW1,
    GW2,
    REGISTRY,
    USER,
    Host,
    World,
    new_world,
    start_transfer,
)
from btmm_core.registry.storage import open_storage

# name -> (engine, home, plug index): the index picks the host's LAN address (.10 + index)
HOSTS = {
    "desktop": ("fast", "gw1", 0),
    "laptop": ("fast", "gw2", 1),
    "nas": ("python", "gw1", 2),
    "phone": ("python", "gw2", 3),
}
ROAMER = "laptop"
ROAM_HOMES = ("gw2", "gw3")
VICTIM = "nas"  # the daemon that is SIGKILLed and restarted
REBOOTED = "gw1"
LOSSY = "gw2"
LOSS_PERCENT = 5
FAULTS = ("gateway-reboot", "registry-kill", "daemon-kill")
#: how long an event may take to recover before the run calls it a failure
RECOVERY_DEADLINE = 90.0


@dataclass
class Event:
    kind: str
    at: float  # seconds since the churn began
    detail: str
    recovered_after: float | None = None
    error: str | None = None


@dataclass
class Transfer:
    pair: str
    src: str
    dst: str
    started: float
    ended: float
    bytes_sent: int = 0
    bytes_received: int = 0
    intact: bool = False
    error: str | None = None
    cut_by_kill: bool = False


@dataclass
class Report:
    minutes: float
    interval: float
    transfers: list[Transfer] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    processes_start: dict[str, dict[str, int]] = field(default_factory=dict)
    processes_end: dict[str, dict[str, int]] = field(default_factory=dict)
    records_left: list[str] = field(default_factory=list)

    @property
    def corrupted(self) -> list[Transfer]:
        return [t for t in self.transfers if t.error is None and not t.intact]

    @property
    def cut(self) -> list[Transfer]:
        return [t for t in self.transfers if t.error is not None]

    @property
    def unexplained_cuts(self) -> list[Transfer]:
        return [t for t in self.cut if not t.cut_by_kill]

    @property
    def unrecovered(self) -> list[Event]:
        return [e for e in self.events if e.recovered_after is None]

    @property
    def ok(self) -> bool:
        return not (self.corrupted or self.unexplained_cuts or self.unrecovered
                    or self.records_left) and bool(self.transfers)


def _proc_stats(pid: int) -> dict[str, int]:
    """RSS (KiB), open file descriptors and threads of a live process; {} once it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return {}
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    return {"rss_kib": int(fields["VmRSS"].split()[0]), "fds": fds,
            "threads": int(fields["Threads"].strip())}


def _processes(world: World) -> dict[str, dict[str, int]]:
    out = {}
    if world.registry is not None:
        out["registry"] = _proc_stats(world.registry.pid)
    for name, host in world.hosts.items():
        if host.proc is not None:
            out[name] = _proc_stats(host.proc.pid)
    return out


def _zone_records(world: World) -> set[str]:
    """Every record in the account's zone, as text, read from the registry's SQLite file."""
    storage = open_storage(world.workdir / "registry" / "registry.sqlite")
    try:
        state = storage.load_zone(dns.name.from_text(f"{USER}.{DOMAIN}"))
    finally:
        storage.close()
    if state is None:
        return set()
    return {f"{r.name} {r.rdtype} {r.rdata.to_text()}" for r in state.records}


def build(lab: Lab) -> World:
    """The four-host world, registry started, every host joined, no daemon running yet."""
    world = new_world(lab, prefix="btmm-soak-")
    invited = tuple(n for n in HOSTS if n != "desktop")
    world.start_registry(lease_min=60, lease_max=7200, invites=invited)
    for spec in (GW1, GW2, CAFE):
        world.add_home(spec.name, spec.wan, spec.lan_prefix)
    for name, (engine, home, index) in HOSTS.items():
        host = world.add_host(name, engine, lease=600, extra={"resolve_interval": 5.0,
                                                              "idle_timeout": 0})
        world.plug(host, world.homes[home], index)
    for name, host in world.hosts.items():
        world.join_host(host, world.account_key if name == "desktop" else world.invite(name))
    return world


def _lossy_uplink(world: World, home: str, percent: int) -> None:
    """Drop ``percent`` % of what crosses the home gateway's WAN side, both ways."""
    world.homes[home].gw.ns.run(["nft", "-f", "-"], input=f"""
table inet lab_loss {{
    chain forward {{
        type filter hook forward priority -10; policy accept;
        iifname "wan0" numgen random mod 100 < {percent} drop
        oifname "wan0" numgen random mod 100 < {percent} drop
    }}
}}
""")


class Streams:
    """One stream per pair of hosts: back-to-back checked transfers until ``stop``."""

    def __init__(self, world: World, rate: float, seconds: float, t0: float,
                 kills: list[list[Any]]) -> None:
        self.world = world
        self.size = int(rate * seconds)
        self.rate = rate
        self.t0 = t0
        self.kills = kills  # (host, from, to) while that host's daemon was down or restarting
        self.transfers: list[Transfer] = []
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        names = list(world.hosts)
        self.pairs = [(a, b) for i, a in enumerate(names) for b in names[i + 1:]]
        self.threads = [threading.Thread(target=self._run, args=(a, b, 6001 + i), daemon=True)
                        for i, (a, b) in enumerate(self.pairs)]

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def stop(self) -> None:
        self.stopping.set()
        for t in self.threads:
            t.join(timeout=self.size / self.rate + 120)

    def _run(self, a: str, b: str, port: int) -> None:
        forward = True
        while not self.stopping.is_set():
            src, dst = (a, b) if forward else (b, a)
            forward = not forward
            record = self._one(self.world.hosts[src], self.world.hosts[dst], port, f"{a}-{b}")
            with self.lock:
                self.transfers.append(record)
            if record.error is not None:
                # the path or a daemon is down: ask again shortly, not in a tight loop
                self.stopping.wait(1.0)

    def _one(self, src: Host, dst: Host, port: int, pair: str) -> Transfer:
        started = time.monotonic() - self.t0
        rec = Transfer(pair, src.name, dst.name, started, started)
        try:
            source, sink = start_transfer(self.world, src, dst, self.size, rate=self.rate,
                                          port=port)
        except (LabError, OSError) as err:
            rec.error = f"start: {err}"
        else:
            try:
                out_s, err_s = source.communicate(timeout=self.size / self.rate + 90)
                if source.returncode != 0:
                    rec.error = f"source exited {source.returncode}: {err_s.strip()[-300:]}"
                    sink.kill()
                out_k, err_k = sink.communicate(timeout=90)
                if rec.error is None and sink.returncode != 0:
                    rec.error = f"sink exited {sink.returncode}: {err_k.strip()[-300:]}"
                if rec.error is None:
                    sent, got = json.loads(out_s), json.loads(out_k)
                    rec.bytes_sent, rec.bytes_received = sent["bytes"], got["bytes"]
                    rec.intact = (sent["bytes"] == got["bytes"] == self.size
                                  and sent["sha256"] == got["sha256"])
            except subprocess.TimeoutExpired:
                rec.error = "no progress before the deadline"
            finally:
                for proc in (source, sink):
                    if proc.poll() is None:
                        proc.kill()
                        proc.wait(timeout=10)
        rec.ended = time.monotonic() - self.t0
        if rec.error is not None:
            rec.cut_by_kill = any(host in (src.name, dst.name) and start <= rec.ended
                                  and end >= rec.started for host, start, end in self.kills)
        return rec


def _registry_answers(world: World) -> bool:
    creds = world.workdir / "registry" / "credentials" / f"{USER}.key"
    proc = world.inet.run(["dig", f"@{REGISTRY}", "-k", str(creds), "+short", "+norecurse",
                           "+time=1", "+tries=1", f"{USER}.{DOMAIN}", "SOA"], check=False)
    return proc.returncode == 0 and bool(proc.stdout.strip())


def _pings(world: World) -> list[str]:
    """The ordered pairs whose ping by name through the tunnel went unanswered (one echo,
    one second): a tunnel is back when packets cross it, not when its keys are installed."""
    failed = []
    for src in world.hosts.values():
        for dst in world.hosts.values():
            if src is dst:
                continue
            proc = src.ns.run(["ping", "-6", "-c", "1", "-W", "1", "-q", dst.fqdn],
                              check=False, timeout=10)
            if proc.returncode != 0:
                failed.append(f"{src.name}->{dst.name}")
    return failed


def _recover(world: World, event: Event, t_event: float) -> None:
    """Wait until the registry answers and every host's ping reaches every other through the
    tunnel; note how long that took."""
    deadline = t_event + RECOVERY_DEADLINE
    why = "the registry did not answer"
    while time.monotonic() < deadline:
        try:
            for host in world.hosts.values():
                world.check_alive(host)
        except LabError as err:
            event.error = str(err).splitlines()[0]
            return
        if _registry_answers(world):
            failed = _pings(world)
            if not failed:
                event.recovered_after = round(time.monotonic() - t_event, 2)
                return
            why = "no ping answer " + " ".join(failed)
        time.sleep(0.2)
    event.error = why


def churn(world: World, minutes: float, interval: float, rate: float, seconds: float,
          say: Any = print) -> Report:
    report = Report(minutes, interval)
    t0 = time.monotonic()
    kills: list[list[Any]] = []
    streams = Streams(world, rate, seconds, t0, kills)
    streams.start()
    roam_home = 0
    fault = 0
    step = 0
    end = t0 + minutes * 60
    while True:
        step += 1
        at = t0 + step * interval / 2
        if at >= end:
            break
        while time.monotonic() < at:
            time.sleep(min(0.5, at - time.monotonic()))
        now = time.monotonic() - t0
        if step % 2 == 0:
            roam_home = 1 - roam_home
            home = ROAM_HOMES[roam_home]
            event = Event("roam", round(now, 1), f"{ROAMER} -> {home}")
            world.plug(world.hosts[ROAMER], world.homes[home], HOSTS[ROAMER][2])
        else:
            kind = FAULTS[fault % len(FAULTS)]
            fault += 1
            event = Event(kind, round(now, 1), "")
            if kind == "gateway-reboot":
                gw = world.homes[REBOOTED].gw
                gw.restart_miniupnpd(lose_state=True)
                gw.ns.run(["conntrack", "-F"], check=False)
                event.detail = f"{REBOOTED}: mappings and connection tracking lost"
            elif kind == "registry-kill":
                world.restart_registry(kill=True)
                event.detail = "SIGKILL, restarted on the same database"
            else:
                victim = world.hosts[VICTIM]
                # streams through it may be cut from now until it is back (or gave up)
                kill_window = [VICTIM, now, float("inf")]
                kills.append(kill_window)
                world.stop_host(victim, kill=True)
                world.start_host(victim)
                event.detail = f"{VICTIM}'s daemon: SIGKILL, restarted"
        t_event = time.monotonic()
        _recover(world, event, t_event)
        if event.kind == "daemon-kill":
            kill_window[2] = time.monotonic() - t0
        report.events.append(event)
        say(f"  {event.at:7.1f} s  {event.kind:15s} {event.detail:45s} "
            + (f"recovered in {event.recovered_after:.1f} s" if event.recovered_after is not None
               else f"NOT RECOVERED: {event.error}"))
    streams.stop()
    report.transfers = list(streams.transfers)
    return report


def run(minutes: float, interval: float, rate: float, seconds: float,
        say: Any = print, logs: Path | None = None) -> Report:
    with Lab("btmms") as lab:
        world = build(lab)
        try:
            return _run(world, minutes, interval, rate, seconds, say)
        finally:
            if logs is not None:
                _keep_logs(world, logs)


def _run(world: World, minutes: float, interval: float, rate: float, seconds: float,
         say: Any) -> Report:
    static = _zone_records(world)
    for host in world.hosts.values():
        world.start_host(host)
    up = world.wait_tunnels(90)
    say(f"four hosts, six tunnels up {up:.1f} s after `btmm up`")
    _lossy_uplink(world, LOSSY, LOSS_PERCENT)
    start = _processes(world)
    say(f"churn for {minutes} min: a roam every {interval:.0f} s, a fault between roams; "
        f"streams of {rate / 1e3:.0f} kB/s x {seconds:.0f} s on each of 6 pairs; "
        f"{LOSS_PERCENT} % loss on {LOSSY}'s uplink")
    report = churn(world, minutes, interval, rate, seconds, say)
    report.processes_start = start
    report.processes_end = _processes(world)
    for host in world.hosts.values():
        world.stop_host(host)  # SIGTERM: a clean shutdown withdraws the host's records
    report.records_left = sorted(_zone_records(world) - static)
    return report


def _keep_logs(world: World, logs: Path) -> None:
    """Copy every daemon's log and the registry's out of the run's temporary directory."""
    logs.mkdir(parents=True, exist_ok=True)
    for name, host in world.hosts.items():
        if host.log is not None and host.log.exists():
            shutil.copy(host.log, logs / f"{name}.log")
    reg = world.workdir / "registry.log"
    if reg.exists():
        shutil.copy(reg, logs / "registry.log")


def render(report: Report) -> str:
    done = [t for t in report.transfers if t.error is None]
    lines = [
        f"soak: {report.minutes} min, {len(report.events)} events, "
        f"{len(report.transfers)} transfers",
        f"  completed {len(done)}, {sum(t.bytes_received for t in done) / 1e6:.1f} MB checked; "
        f"corrupted {len(report.corrupted)}; cut {len(report.cut)} "
        f"(by a daemon kill {len(report.cut) - len(report.unexplained_cuts)}, "
        f"otherwise {len(report.unexplained_cuts)})",
    ]
    for t in report.unexplained_cuts:
        lines.append(f"    cut without a kill: {t.src} -> {t.dst} at {t.started:.1f}-"
                     f"{t.ended:.1f} s: {t.error}")
    lines.append("  recovery (s) by event: median / max / count")
    kinds = sorted({e.kind for e in report.events})
    for kind in kinds:
        times = [e.recovered_after for e in report.events
                 if e.kind == kind and e.recovered_after is not None]
        failed = sum(1 for e in report.events if e.kind == kind and e.recovered_after is None)
        if times:
            lines.append(f"    {kind:15s} {statistics.median(times):6.1f} / {max(times):6.1f} "
                         f"/ {len(times)}" + (f"  ({failed} not recovered)" if failed else ""))
        else:
            lines.append(f"    {kind:15s} none recovered ({failed})")
    lines.append("  process      RSS MiB start->end   fds start->end   threads start->end")
    for name in report.processes_start:
        a, b = report.processes_start[name], report.processes_end.get(name, {})
        if not a or not b:
            lines.append(f"    {name:10s} (not running at the start or the end)")
            continue
        lines.append(f"    {name:10s} {a['rss_kib'] / 1024:7.1f} -> {b['rss_kib'] / 1024:7.1f}"
                     f"      {a['fds']:5d} -> {b['fds']:<5d}     {a['threads']:4d} -> "
                     f"{b['threads']}")
    lines.append("  (the killed daemon and the restarted registry are new processes at the end)")
    lines.append(f"  records left in the zone after a clean shutdown: {len(report.records_left)}")
    lines += [f"    {r}" for r in report.records_left]
    lines.append("  clock steps: not simulated (see the module docstring)")
    lines.append(f"  verdict: {'OK' if report.ok else 'FAILED'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python3 -m bench.soak", description=__doc__.split("\n")[0])
    ap.add_argument("--minutes", type=float, default=60.0)
    ap.add_argument("--interval", type=float, default=30.0,
                    help="seconds between roams; a fault falls half-way between two")
    ap.add_argument("--rate", type=float, default=64e3, help="bytes/s of each stream")
    ap.add_argument("--transfer-seconds", type=float, default=15.0,
                    help="how long one transfer of a stream runs")
    ap.add_argument("--json", type=Path, help="also write the report here")
    ap.add_argument("--logs", type=Path, help="copy the daemons' and the registry's logs here")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("the soak builds network namespaces: run it as root", file=sys.stderr)
        return 2
    report = run(args.minutes, args.interval, args.rate, args.transfer_seconds,
                 logs=args.logs)
    text = render(report)
    print(text)
    if args.json:
        data = asdict(report)
        data["ok"] = report.ok
        args.json.write_text(json.dumps(data, indent=1))
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
