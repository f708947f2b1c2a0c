"""``btmm bench`` (``python3 -m bench.codec``): what the ESP codec (RFC 4303 / RFC 4106
AES-256-GCM) costs per engine.

For each engine and inner packet size, one "operation" is seal + open of one packet by the
engine's codec, set beside the bare AES-256-GCM encrypt + decrypt of the same plaintext (the
ceiling: what the codec would cost if framing, replay window and copies were free). The fast
engine's loops run in Rust (``_fast.bench_codec`` / ``_fast.bench_aead`` return seconds); the
Python engine's loops run over ``EspTxSa.seal``/``EspRxSa.open`` and ``AESGCM``.

The machine is shared and noisy (docs/architecture.md section 11): measurements are
interleaved (each repetition visits every engine, size and system in turn) and reported as
median with min-max, plus the ratio codec/ceiling. Throughput counts inner bytes only.

Where valgrind is installed, the fast engine's two Rust loops are also counted in instructions
per packet (callgrind: a count that does not depend on the machine's load). Each loop runs in
its own interpreter under callgrind once with ``INSTRUCTION_COUNT`` packets and once with
none; the difference over the count is the cost of one seal + open, without interpreter
start-up, import and key setup. ``perf stat -e instructions`` would be cheaper but needs
hardware counters, which virtual machines often do not expose. Caveat: valgrind presents its
own CPU, so ring may pick a different AES-GCM code path under it than on the bare machine.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace

import click
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from btmm_core.dataplane import KINDS, resolve_kind, rx_codec, tx_codec
from btmm_core.dataplane.api import KEYMAT_LEN
from btmm_core.errors import BtmmError

SIZES = (64, 512, 1400)
#: packets per measurement: Rust loops are ~100x faster than Python ones
COUNTS = {"fast": 500_000, "python": 50_000}
QUICK_COUNTS = {"fast": 2_000, "python": 300}
REPETITIONS = 5
QUICK_REPETITIONS = 2
_SPI = 0x1234_5678
#: packets per callgrind run (the result is exact per run, so one short run is enough)
INSTRUCTION_COUNT = 2_000
#: the Rust loops counted in instructions, by the report's system name
_FAST_LOOPS = {"codec": "bench_codec", "aead": "bench_aead"}


@dataclass(frozen=True)
class Stat:
    """Packets/s and Gbit/s (inner bytes) over the repetitions: median, min, max."""

    pps_median: float
    pps_min: float
    pps_max: float
    gbps_median: float
    gbps_min: float
    gbps_max: float

    @classmethod
    def of(cls, seconds: Sequence[float], size: int, count: int) -> Stat:
        pps = [count / s for s in seconds]

        def gbps(p: float) -> float:
            return p * size * 8 / 1e9

        med = statistics.median(pps)
        return cls(med, min(pps), max(pps), gbps(med), gbps(min(pps)), gbps(max(pps)))


@dataclass(frozen=True)
class Row:
    engine: str
    size: int
    count: int
    repetitions: int
    codec: Stat
    aead: Stat
    #: codec throughput / bare AES-GCM throughput (medians); 1.0 means the codec adds nothing
    ratio: float
    #: instructions per seal + open (callgrind), None where not measured (see Instructions)
    codec_instructions: float | None = None
    aead_instructions: float | None = None


@dataclass(frozen=True)
class Instructions:
    """Whether instructions per packet were counted, with what, and if not, why not."""

    #: the tool is installed
    available: bool
    tool: str
    note: str
    #: the rows carry instruction counts (fast engine rows only)
    measured: bool = False


def instructions_tool() -> Instructions:
    """Callgrind when valgrind is on PATH; otherwise a reason the report can show."""
    if shutil.which("valgrind") is None:
        return Instructions(
            False,
            "none",
            "instructions per packet not measured: valgrind is not installed "
            "(apt-get install valgrind)",
        )
    return Instructions(
        True,
        "callgrind",
        f"instructions per seal+open of the fast engine's Rust loops under valgrind callgrind "
        f"({INSTRUCTION_COUNT} packets minus a run of 0); valgrind's virtual CPU may steer "
        "ring to another AES-GCM code path than the bare machine",
    )


_TOTALS = re.compile(r"^(?:totals|summary):\s+(\d+)", re.MULTILINE)


def callgrind_instructions(function: str, size: int, count: int) -> int:
    """Instructions callgrind counts for a whole interpreter that calls
    ``btmm_core._fast.<function>(size, count)`` once."""
    resolve_kind("fast")  # a clear EngineUnavailable when the extension is not built
    code = f"import btmm_core._fast as f; f.{function}({size}, {count})"
    with tempfile.TemporaryDirectory(prefix="btmm-callgrind-") as tmp:
        out = os.path.join(tmp, "callgrind.out")
        proc = subprocess.run(
            [
                "valgrind",
                "--tool=callgrind",
                f"--callgrind-out-file={out}",
                sys.executable,
                "-c",
                code,
            ],
            capture_output=True,
            text=True,
            timeout=600,
            # the same hash seed in both runs, so that start-up does the same work
            env={**os.environ, "PYTHONHASHSEED": "0"},
        )
        if proc.returncode != 0:
            raise BtmmError(
                f"valgrind callgrind failed on {function}({size}, {count}) "
                f"(exit {proc.returncode}): {proc.stderr[-1500:]}; run without --instructions "
                "to skip the instruction counts"
            )
        with open(out) as f:
            found = _TOTALS.search(f.read())
    if found is None:
        raise BtmmError(f"callgrind wrote no totals line for {function}({size}, {count})")
    return int(found.group(1))


def instructions_per_packet(system: str, size: int, count: int = INSTRUCTION_COUNT) -> float:
    """Instructions per seal + open of one ``size``-byte packet in the fast engine's
    ``system`` loop ("codec" or "aead"): a run of ``count`` minus a run of none."""
    function = _FAST_LOOPS[system]
    loaded = callgrind_instructions(function, size, count)
    baseline = callgrind_instructions(function, size, 0)
    if loaded <= baseline:
        raise BtmmError(
            f"callgrind counted no work for {count} packets of {system} at {size} bytes "
            f"({loaded} vs baseline {baseline})"
        )
    return (loaded - baseline) / count


def with_instructions(rows: Sequence[Row], count: int = INSTRUCTION_COUNT) -> list[Row]:
    """The rows with instructions per packet filled in for the fast engine."""
    out = []
    for r in rows:
        if r.engine != "fast":
            out.append(r)
            continue
        out.append(
            replace(
                r,
                codec_instructions=instructions_per_packet("codec", r.size, count),
                aead_instructions=instructions_per_packet("aead", r.size, count),
            )
        )
    return out


def _packet(size: int) -> bytes:
    # Shaped like an IPv6 packet (version nibble 6) so that no codec rejects it on sight.
    body = os.urandom(size)
    return b"\x60" + body[1:]


def python_codec(size: int, count: int) -> float:
    """Seconds for ``count`` seal+open pairs through the pure-Python ESP codec."""
    key = os.urandom(KEYMAT_LEN)
    tx, rx = tx_codec(_SPI, key, kind="python"), rx_codec(_SPI, key, kind="python")
    packet = _packet(size)
    seal, open_ = tx.seal, rx.open
    start = time.perf_counter()
    for _ in range(count):
        out = open_(seal(packet))
    elapsed = time.perf_counter() - start
    if out != packet:
        raise BtmmError("the Python codec did not give back the packet it sealed")
    return elapsed


def python_aead(size: int, count: int) -> float:
    """Seconds for ``count`` bare AES-256-GCM encrypt+decrypt pairs (cryptography/OpenSSL),
    with the codec's nonce and AAD sizes and its padded plaintext length."""
    key = os.urandom(KEYMAT_LEN)
    aead = AESGCM(key[:32])
    plaintext = _packet(size) + bytes(-(size + 2) % 4 + 2)
    salt, aad = key[32:], bytes(12)
    encrypt, decrypt = aead.encrypt, aead.decrypt
    start = time.perf_counter()
    for seq in range(1, count + 1):
        nonce = salt + seq.to_bytes(8, "big")
        out = decrypt(nonce, encrypt(nonce, plaintext, aad), aad)
    elapsed = time.perf_counter() - start
    if out != plaintext:
        raise BtmmError("AES-GCM did not give back the plaintext it encrypted")
    return elapsed


def _loops(engine: str) -> tuple[Callable[[int, int], float], Callable[[int, int], float]]:
    if engine == "python":
        return python_codec, python_aead
    resolve_kind("fast")  # a clear EngineUnavailable when the extension is not built
    fast = importlib.import_module("btmm_core._fast")

    def codec(size: int, count: int) -> float:
        return float(fast.bench_codec(size, count))

    def aead(size: int, count: int) -> float:
        return float(fast.bench_aead(size, count))

    return codec, aead


def run(
    engines: Sequence[str],
    sizes: Sequence[int] = SIZES,
    repetitions: int = REPETITIONS,
    counts: dict[str, int] | None = None,
) -> list[Row]:
    """Measure every (engine, size), interleaved over ``repetitions`` rounds."""
    counts = counts or COUNTS
    loops = {e: _loops(e) for e in engines}
    codec_s: dict[tuple[str, int], list[float]] = {(e, s): [] for e in engines for s in sizes}
    aead_s: dict[tuple[str, int], list[float]] = {(e, s): [] for e in engines for s in sizes}
    for rep in range(repetitions):
        for engine in engines:
            codec, aead = loops[engine]
            for size in sizes:
                n = counts[engine]
                # Alternate which system goes first so that neither always gets a warm cache.
                if rep % 2:
                    aead_s[engine, size].append(aead(size, n))
                    codec_s[engine, size].append(codec(size, n))
                else:
                    codec_s[engine, size].append(codec(size, n))
                    aead_s[engine, size].append(aead(size, n))
    rows = []
    for engine in engines:
        for size in sizes:
            n = counts[engine]
            c = Stat.of(codec_s[engine, size], size, n)
            a = Stat.of(aead_s[engine, size], size, n)
            rows.append(Row(engine, size, n, repetitions, c, a, c.pps_median / a.pps_median))
    return rows


def to_json(rows: Sequence[Row], instructions: Instructions | None = None) -> dict[str, object]:
    return {
        "unit": {
            "pps": "inner packets per second",
            "gbps": "inner Gbit/s",
            "instructions": "instructions per seal + open (null: not measured)",
        },
        "instructions": asdict(instructions or Instructions(False, "none", "not requested")),
        "results": [asdict(r) for r in rows],
    }


def _instr(value: float | None) -> str:
    return "n/a" if value is None else f"{value:,.0f}"


def _table(rows: Sequence[Row], instructions: Instructions | None = None) -> object:
    from rich.table import Table

    caption = "median (min-max) over interleaved repetitions; inner bytes only"
    if instructions is not None:
        caption += "\n" + instructions.note
    table = Table(
        title="ESP codec: seal + open per packet, beside bare AES-256-GCM", caption=caption
    )
    columns = ["engine", "size", "codec kpps", "codec Gbit/s", "AES-GCM Gbit/s", "codec/AES"]
    # Only measured columns: an 80-column terminal has no room for two columns of "n/a".
    counted = any(r.codec_instructions is not None for r in rows)
    if counted:
        columns += ["codec instr/pkt", "AES instr/pkt"]
    for col in columns:
        table.add_column(col, justify="left" if col == "engine" else "right")
    for r in rows:
        cells = [
            r.engine,
            str(r.size),
            f"{r.codec.pps_median / 1e3:.0f} ({r.codec.pps_min / 1e3:.0f}-"
            f"{r.codec.pps_max / 1e3:.0f})",
            f"{r.codec.gbps_median:.2f} ({r.codec.gbps_min:.2f}-{r.codec.gbps_max:.2f})",
            f"{r.aead.gbps_median:.2f} ({r.aead.gbps_min:.2f}-{r.aead.gbps_max:.2f})",
            f"{r.ratio:.2f}",
        ]
        if counted:
            cells += [_instr(r.codec_instructions), _instr(r.aead_instructions)]
        table.add_row(*cells)
    return table


@click.command("bench")
@click.option(
    "--engine",
    "engines",
    type=click.Choice([*KINDS, "all"]),
    default="all",
    show_default=True,
    help="Which engine's codec to measure; all needs the Rust extension built.",
)
@click.option(
    "--size",
    "sizes",
    type=click.IntRange(40, 65000),
    multiple=True,
    help="Inner packet size in bytes (repeatable); default 64, 512, 1400.",
)
@click.option(
    "--repetitions",
    type=click.IntRange(1, 100),
    default=None,
    help=f"Interleaved rounds (default {REPETITIONS}, {QUICK_REPETITIONS} with --quick).",
)
@click.option("--quick", is_flag=True, help="Few packets and rounds: a smoke run, not a figure.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option(
    "--instructions/--no-instructions",
    default=None,
    help="Count the fast engine's instructions per packet under valgrind callgrind (about a "
    "minute more). Default: on when valgrind is installed, off with --quick.",
)
@click.option(
    "--e2e",
    is_flag=True,
    help="Instead: iperf3 end to end through btmm, wireguard-go and OpenVPN beside plain veth, "
    "in network namespaces (root). Prints the report; `python3 -m bench.e2e` has all the "
    "options, --save among them.",
)
@click.option(
    "--systems",
    default="all",
    show_default=True,
    help="With --e2e: comma-separated subset of veth, btmm-fast, btmm-python, wireguard-go, "
    "openvpn.",
)
def bench(
    engines: str,
    sizes: tuple[int, ...],
    repetitions: int | None,
    quick: bool,
    as_json: bool,
    instructions: bool | None = None,
    e2e: bool = False,
    systems: str = "all",
) -> None:
    """Measure the ESP codec of each engine against bare AES-256-GCM."""
    try:
        if e2e:
            from bench.e2e import cli

            cli.main(cli.parse_systems(systems), quick, repetitions, as_json)
            return
        chosen = list(KINDS) if engines == "all" else [engines]
        reps = repetitions or (QUICK_REPETITIONS if quick else REPETITIONS)
        rows = run(chosen, sizes or SIZES, reps, QUICK_COUNTS if quick else COUNTS)
        rows, tool = counted(rows, chosen, instructions, quick)
    except BtmmError as err:
        raise click.ClickException(str(err)) from err
    if as_json:
        click.echo(json.dumps(to_json(rows, tool), indent=2))
    else:
        from rich.console import Console

        Console().print(_table(rows, tool))


def counted(
    rows: list[Row], engines: Sequence[str], wanted: bool | None, quick: bool
) -> tuple[list[Row], Instructions]:
    """The rows with instruction counts where asked for (``wanted``; None: when valgrind is
    installed and the run is not ``quick``), and what the report says about them."""
    tool = instructions_tool()
    if wanted is None:
        wanted = tool.available and not quick
    if wanted and not tool.available:
        raise BtmmError(tool.note)
    if wanted and "fast" not in engines:
        return rows, replace(tool, note="instructions are counted for the fast engine only")
    if wanted:
        return with_instructions(rows), replace(tool, measured=True)
    if tool.available:
        note = (
            "instructions per packet not measured (--quick or --no-instructions; "
            "--instructions counts them)"
        )
        return rows, replace(tool, note=note)
    return rows, tool


def main() -> None:
    bench()


if __name__ == "__main__":
    main()
