"""How fast a peer's name reaches ordinary programs through the stub resolver (issue 16): the
time from a peer's ``btmm up`` (the process started) until ``getent ahosts <peer>`` on another
host answers its ULA, and from its clean stop until the name is gone; ``--runs`` times in one
lab world (registry and both hosts on the lab internet, no hosts block, resolv.conf naming
the stub). Needs root.

    python3 -m bench.names --runs 5 [--json /tmp/names.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from btmm_core.lab.netns import Lab, Netns
from btmm_core.lab.world import USER, build_world


def _resolves(ns: Netns, name: str) -> list[str]:
    out = ns.run(["getent", "ahosts", name], check=False).stdout
    return sorted({line.split()[0] for line in out.splitlines() if line.strip()})


def _until(pred: object, timeout: float) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if pred():  # type: ignore[operator]
            return time.monotonic() - t0
        time.sleep(0.02)
    raise RuntimeError(f"not within {timeout} s")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    up: list[float] = []
    down: list[float] = []
    with Lab("btmmb") as lab:
        world = build_world(lab, nat=False, host_extra={"hosts_file": "", "upstream": "none"})
        laptop, desktop = world.hosts["laptop"], world.hosts["desktop"]
        fqdn = f"desktop.{USER}.members.example"
        world.start_host(laptop)
        for i in range(args.runs):
            world.start_host(desktop)
            up.append(_until(lambda: _resolves(laptop.ns, fqdn) != [], 30))
            world.stop_host(desktop)
            t0 = time.monotonic()
            _until(lambda: _resolves(laptop.ns, fqdn) == [], 30)
            down.append(time.monotonic() - t0)
            print(f"run {i + 1}: resolvable {up[-1]:.2f} s after btmm up, "
                  f"gone {down[-1]:.2f} s after its stop", flush=True)
    result = {"runs": args.runs, "up_median_s": round(statistics.median(up), 3),
              "down_median_s": round(statistics.median(down), 3), "up_s": up, "down_s": down}
    print(f"median: {result['up_median_s']} s from btmm up to getent; "
          f"{result['down_median_s']} s from a clean stop to the name gone")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
