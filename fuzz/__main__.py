"""``python3 -m fuzz TARGET [--runs N | --seconds S]``: run one target under atheris.

The committed seeds are read, never written: libFuzzer puts what it finds into a work
corpus (``--work``, a temporary directory unless given) and a crash input into
``--artifacts``. Exit status 0: no crash; otherwise libFuzzer's (the crash is printed with
the input's file). Arguments after ``--`` go to libFuzzer as they are.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

CORPUS = Path(__file__).resolve().parent / "corpus"
# Names only, so that --list needs no import of the (instrumented) targets.
NAMES = ("registry", "llq_server", "llq_client", "push_server", "push_client", "dso", "tsig",
         "natpmp", "pcp", "handshake", "stun", "probe", "turn_client")

#: Modules whose bytecode atheris 2.3.0 rewrites wrongly on Python 3.11: the instrumented
#: code raises where the original does not (a ``while True`` loop with an ``or`` of
#: comparisons, as in the old ``fastpath._labels``, gets a broken stack). Every input then
#: "crashes", so they run uninstrumented; ``--plain`` replays an input without any
#: instrumentation to tell such a false crash from a real one.
MISCOMPILED = ("btmm_core.dns.fastpath",)


def main(argv: list[str]) -> int:
    extra: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1 :]
    ap = argparse.ArgumentParser(prog="python3 -m fuzz", description=__doc__)
    ap.add_argument("target", nargs="?", choices=NAMES)
    ap.add_argument("--list", action="store_true", help="name the targets and stop")
    ap.add_argument("--runs", type=int, help="stop after this many executions")
    ap.add_argument("--seconds", type=int, help="stop after this many seconds")
    ap.add_argument("--work", type=Path, help="corpus directory new inputs go to")
    ap.add_argument("--plain", nargs="+", type=Path, metavar="FILE",
                    help="run these inputs once, uninstrumented, and stop")
    ap.add_argument("--artifacts", type=Path, help="directory for crash inputs (default: work)")
    args = ap.parse_args(argv)
    if args.list or args.target is None:
        print("\n".join(NAMES))
        return 0

    if args.plain:
        from fuzz.targets import TARGETS

        for f in args.plain:
            TARGETS[args.target].run(f.read_bytes())
            print(f"{f}: clean")
        return 0

    import atheris

    # Instrument our code and dnspython (the registry's first parser) for coverage; nothing
    # of either may be imported before this point. MISCOMPILED modules are left out.
    with atheris.instrument_imports(include=["btmm_core", "dns", "fuzz.targets"],
                                    exclude=list(MISCOMPILED)):
        from fuzz.targets import TARGETS
    from btmm_core.log import configure_logging

    configure_logging("error")  # refusals log at info/warning: millions of lines otherwise

    target = TARGETS[args.target]
    work = args.work or Path(tempfile.mkdtemp(prefix=f"btmm-fuzz-{args.target}-"))
    work.mkdir(parents=True, exist_ok=True)
    artifacts = args.artifacts or work
    artifacts.mkdir(parents=True, exist_ok=True)
    flags = [f"-artifact_prefix={artifacts}/", "-timeout=10", "-print_final_stats=1"]
    if args.runs is not None:
        flags.append(f"-runs={args.runs}")
    if args.seconds is not None:
        flags.append(f"-max_total_time={args.seconds}")
    seeds = CORPUS / args.target
    print(f"fuzz {target.name}: {target.about}; work corpus {work}", file=sys.stderr)
    atheris.Setup([sys.argv[0], *flags, *extra, str(work), str(seeds)], target.run)
    atheris.Fuzz()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
