"""First-packet latency of an on-demand tunnel (issue 16): the RTT of the first ping to a peer
whose tunnel is idle (held by the engine while the handshake runs, then sent), beside the RTT
of the next ping through the open tunnel; ``--runs`` times per engine pairing (fast/fast and
python/python), in one lab world each (both hosts on the lab internet, ``idle_timeout`` short
so that the tunnel is idle again before each run). Needs root.

    python3 -m bench.ondemand --runs 5 [--json /tmp/ondemand.json]
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import time
from typing import Any

from btmm_core.lab.netns import Lab
from btmm_core.lab.world import Host, build_world

IDLE = 2.0
PAIRS = (("fast", "fast"), ("python", "python"))


def _peer(host: Host) -> dict[str, Any]:
    peers: list[dict[str, Any]] = (host.status() or {}).get("peers", [])
    return peers[0] if peers else {}


def _until(pred: object, timeout: float) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if pred():  # type: ignore[operator]
            return
        time.sleep(0.05)
    raise RuntimeError(f"not within {timeout} s")


def _rtt_ms(host: Host, dest: str) -> float:
    """The RTT of one ping as ping prints it; RuntimeError when it was not answered."""
    out = host.ns.run(["ping", "-6", "-n", "-c", "1", "-W", "10", dest], check=False,
                      timeout=30).stdout
    m = re.search(r"time=([\d.]+) ms", out)
    if m is None:
        raise RuntimeError(f"ping {dest} not answered:\n{out}")
    return float(m.group(1))


def measure(planes: tuple[str, str], runs: int) -> dict[str, Any]:
    first: list[float] = []
    warm: list[float] = []
    with Lab("btmmq") as lab:
        world = build_world(lab, nat=False, dataplanes=planes,
                            host_extra={"idle_timeout": IDLE, "connect_timeout": 10})
        for h in world.hosts.values():
            world.start_host(h)
        desktop, laptop = world.hosts["desktop"], world.hosts["laptop"]
        for h in (desktop, laptop):
            _until(lambda h=h: _peer(h).get("endpoint") and _peer(h).get("tunnel") == "idle", 30)
        ula = _peer(laptop)["ula"]
        for i in range(runs):
            # both sides idle: the next packet waits for a whole handshake
            _until(lambda: all(_peer(h).get("tunnel") == "idle" for h in (desktop, laptop)),
                   IDLE + 20)
            first.append(_rtt_ms(laptop, ula))
            warm.append(_rtt_ms(laptop, ula))
            print(f"{planes[0]}/{planes[1]} run {i + 1}: first packet {first[-1]:.2f} ms, "
                  f"open tunnel {warm[-1]:.2f} ms", flush=True)
    return {"engines": f"{planes[0]}/{planes[1]}", "runs": runs,
            "first_median_ms": round(statistics.median(first), 2),
            "open_median_ms": round(statistics.median(warm), 2),
            "first_ms": first, "open_ms": warm}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    results = [measure(planes, args.runs) for planes in PAIRS]
    for r in results:
        print(f"{r['engines']}: first-packet RTT median {r['first_median_ms']} ms "
              f"(open tunnel {r['open_median_ms']} ms), {r['runs']} runs")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
