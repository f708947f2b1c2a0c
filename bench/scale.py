"""One account with many hosts in one lab (issue 16, "Scale"): every host learns every other,
but only the pairs that talk hold tunnels (on-demand tunnels); how the daemons' memory and idle
CPU grow with the number of hosts. Needs root.

For each size: a lab world with the registry and N hosts on the lab internet (no NAT), two
with the fast engine and the rest with the Python one, every tunnel on demand
(``idle_timeout`` 300 s); all hosts join with the account's key (quicker than N invites; the
daemons warn about it). Measured: seconds from starting N-1 daemons at once until every one
lists every other as a peer (a cold start, and the registry's CPU meanwhile); then, after
``--settle`` seconds, each daemon's RSS (median and max) and CPU over ``--window`` idle
seconds (median and max, percent of one core), and the registry's; then seconds from
starting the last host until all N know each other (a device coming online in a running
account); then one ping between two hosts, and how many tunnels are up in the whole account
(expected: that pair's, on both sides).

    python3 -m bench.scale --hosts 10 50 100 [--json /tmp/scale.json]

The lab's cost grows with N squared (every host reads and follows every other's records and
checks a path to each), and a cold start on one small machine is also N Python start-ups at
once: start with 10. The hosts' ARP entries are pinned (``World.pin_internet_neighbours``):
the kernel's one ARP table for all namespaces overflows at about 30 hosts, which separate
machines never share.
"""

from __future__ import annotations

import argparse
import compileall
import json
import os
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import btmm_core
from btmm_core.lab.netns import Lab
from btmm_core.lab.world import Host, World, build_world

EXTRA = {"idle_timeout": 300, "hosts_file": "", "upstream": "none", "resolve_interval": 30.0}
TICKS = os.sysconf("SC_CLK_TCK")


def _peers(host: Host) -> list[dict[str, Any]]:
    peers: list[dict[str, Any]] = (host.status() or {}).get("peers", [])
    return peers


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


def _cpu_ticks(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime, stime


def _pids(world: World) -> list[int]:
    """The running daemons' pids (a host not started yet has none); RuntimeError if one
    exited."""
    pids = []
    for h in world.hosts.values():
        if h.proc is None:
            continue
        if h.proc.poll() is not None:
            raise RuntimeError(f"the daemon of {h.name} exited:\n{world.tails()}")
        pids.append(h.proc.pid)
    return pids


def _missing(world: World, pending: set[str]) -> str:
    """Which peers each host lacks, and what its log says about them."""
    out = []
    for name in sorted(pending):
        host = world.hosts[name]
        known = {p["name"].split(".")[0] for p in _peers(host)}
        lacking = sorted(set(world.hosts) - known - {name})
        out.append(f"{name} lacks {', '.join(lacking)}")
        log = host.log.read_text(errors="replace").splitlines() if host.log else []
        out += [f"  {line}" for line in log
                if any(f"peer={p}" in line or f"{p}." in line for p in lacking)][-8:]
    return "\n".join(out)


def build(lab: Lab, n: int) -> World:
    world = build_world(lab, nat=False, dataplanes=("fast", "fast"), host_extra=EXTRA)
    extra = [world.add_host(f"h{i}", "python", lease=1800, extra=EXTRA) for i in range(3, n + 1)]
    for i, host in enumerate(extra, start=3):
        world.plug(host, None, i)
    # the namespaces share the kernel's ARP table, which would overflow past ~30 hosts
    world.pin_internet_neighbours()
    with ThreadPoolExecutor(max_workers=4) as pool:
        list(pool.map(lambda h: world.join_host(h, world.account_key, timeout=120), extra))
    return world


#: status requests a second at most while waiting: one daemon's status lists every peer (66 KB
#: and about 8 ms of its CPU with 98), and asking each of 100 hosts twice a second took more of
#: the machine than the daemons being measured
STATUS_RATE = 20.0


def _wait_known(world: World, names: list[str], timeout: float, t0: float) -> float:
    """Seconds since ``t0`` until each of ``names`` lists all the others as peers (each host
    asked every 0.5 s, or less often when so many are pending that ``STATUS_RATE`` binds)."""
    pending = set(names)
    while pending:
        if time.monotonic() - t0 > timeout:
            raise RuntimeError(f"{len(pending)} hosts still do not know all {len(names) - 1} "
                               f"peers after {timeout} s:\n{_missing(world, pending)}")
        began = time.monotonic()
        asked = len(pending)
        for name in sorted(pending):
            if len(_peers(world.hosts[name])) == len(names) - 1:
                pending.discard(name)
        _pids(world)
        if pending:
            time.sleep(max(0.5, asked / STATUS_RATE - (time.monotonic() - began)))
    return time.monotonic() - t0


def _cpu_pct(pid: int, ticks_before: int, seconds: float) -> float:
    return 100.0 * (_cpu_ticks(pid) - ticks_before) / TICKS / seconds


def measure(n: int, settle: float, window: float, timeout: float) -> dict[str, Any]:
    """All hosts but one start at once (cold start: on this shared machine mostly N Python
    start-ups and the N^2 first reads); idle; then the last one joins the running account
    (what a user sees when a device comes online)."""
    with Lab("btmmx") as lab:
        world = build(lab, n)
        hosts = list(world.hosts.values())
        *first, late = hosts
        assert world.registry is not None
        registry = world.registry.pid
        reg_before = _cpu_ticks(registry)
        t0 = time.monotonic()
        for h in first:
            world.start_host(h)
        cold = _wait_known(world, [h.name for h in first], timeout, t0)
        registry_cold_cpu = _cpu_pct(registry, reg_before, cold)
        print(f"{n - 1} hosts started at once: every host knows every other after "
              f"{cold:.1f} s (registry {registry_cold_cpu:.0f} % of a core meanwhile)",
              flush=True)
        time.sleep(settle)
        pids = _pids(world)
        before = {p: _cpu_ticks(p) for p in [*pids, registry]}
        time.sleep(window)
        cpu = [_cpu_pct(p, before[p], window) for p in _pids(world)]
        registry_cpu = _cpu_pct(registry, before[registry], window)
        rss = [_rss_kib(p) / 1024 for p in pids]
        t1 = time.monotonic()
        world.start_host(late)
        join = _wait_known(world, [h.name for h in hosts], timeout, t1)
        print(f"{late.name} joins {n - 1} running hosts: all {n} know each other after "
              f"{join:.1f} s", flush=True)
        # one pair talks: only its tunnel opens
        a = world.hosts["desktop"]
        ula = next(p["ula"] for p in _peers(a) if p["name"].startswith("laptop."))
        ping = a.ns.run(["ping", "-6", "-n", "-c", "1", "-W", "10", ula], check=False)
        up = {h.name: sum(p["tunnel"] == "up" for p in _peers(h)) for h in hosts}
        result = {
            "hosts": n,
            "cold_start_hosts": n - 1,
            "know_all_s": round(cold, 1),
            "registry_cold_start_cpu_pct": round(registry_cold_cpu, 1),
            "join_s": round(join, 1),
            "rss_mib_median": round(statistics.median(rss), 1),
            "rss_mib_max": round(max(rss), 1),
            "idle_cpu_pct_median": round(statistics.median(cpu), 2),
            "idle_cpu_pct_max": round(max(cpu), 2),
            "registry_idle_cpu_pct": round(registry_cpu, 2),
            "registry_rss_mib": round(_rss_kib(registry) / 1024, 1),
            "ping_answered": ping.returncode == 0,
            "tunnels_up": {k: v for k, v in up.items() if v},
        }
        print(json.dumps(result), flush=True)
        return result


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--hosts", type=int, nargs="+", default=[10])
    # longer than one resolver round (30 s, +10 %): each daemon's first round after the zone
    # stopped changing checks every peer once, which is not idle
    ap.add_argument("--settle", type=float, default=45.0)
    ap.add_argument("--window", type=float, default=30.0)
    ap.add_argument("--timeout", type=float, default=600.0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    # the byte code, once: with PYTHONDONTWRITEBYTECODE set (as on the machine measured) each
    # of N daemons would otherwise compile every module at start (py-spy: a quarter of its
    # start-up)
    compileall.compile_dir(os.path.dirname(btmm_core.__file__), quiet=1)
    results = [measure(n, args.settle, args.window, args.timeout) for n in args.hosts]
    print("hosts  cold start (N-1)  join  RSS MiB (median/max)  idle CPU % (median/max)  "
          "registry idle CPU % / RSS MiB  tunnels up")
    for r in results:
        print(f"{r['hosts']:5}  {r['know_all_s']:15.1f}s  {r['join_s']:4.1f}s  "
              f"{r['rss_mib_median']:8.1f} / {r['rss_mib_max']:<8.1f}  "
              f"{r['idle_cpu_pct_median']:8.2f} / {r['idle_cpu_pct_max']:<8.2f}  "
              f"{r['registry_idle_cpu_pct']:8.2f} / {r['registry_rss_mib']:<8.1f}  "
              f"{sum(r['tunnels_up'].values())}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
