"""The command of the end-to-end bench: ``python3 -m bench.e2e`` (every option) and
``btmm bench --e2e`` (a few of them, through ``main``).

A run prints its report (a table, or the JSON with ``--json``) and writes files only where
asked: ``--output``/``--chart`` name them, ``--save`` writes the published figures
``bench/results/e2e.json`` and ``bench/results/e2e.png`` (tracked in git; see bench/README.md).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import click

from bench import RESULTS
from bench.e2e import BenchError
from bench.e2e.measure import FULL, QUICK, UDP_SIZES, Durations, RunResult, run
from bench.e2e.report import chart, table, to_json
from bench.e2e.systems import SYSTEMS, parse_systems
from btmm_core.errors import BtmmError

SAVED_JSON = RESULTS / "e2e.json"
SAVED_CHART = RESULTS / "e2e.png"

__all__ = ["main", "parse_systems", "script"]


def durations_for(quick: bool, repetitions: int | None, tcp_seconds: int | None) -> Durations:
    """FULL or QUICK, with the repetitions and TCP seconds given on the command line."""
    base = QUICK if quick else FULL
    return Durations(
        tcp=tcp_seconds or base.tcp,
        udp_probe=base.udp_probe,
        udp_probes=base.udp_probes,
        repetitions=repetitions or base.repetitions,
    )


def run_with_progress(
    systems: Sequence[str], durations: Durations, transient: bool
) -> list[RunResult]:
    """``measure.run`` under a progress bar on stderr (stdout stays clean for --json)."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    steps_per_run = 2 + len(UDP_SIZES) + 1
    with Progress(
        TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(), console=Console(stderr=True), transient=transient,
    ) as progress:  # fmt: skip
        task = progress.add_task(
            "starting", total=steps_per_run * len(systems) * durations.repetitions
        )
        started = False

        def step(what: str) -> None:
            nonlocal started
            if started:
                progress.advance(task)
            started = True
            progress.update(task, description=what)

        runs = run(systems, durations, step)
        progress.update(task, completed=progress.tasks[0].total, description="finished")
    return runs


def main(
    systems: Sequence[str],
    quick: bool,
    repetitions: int | None,
    as_json: bool,
    output: Path | None = None,
    chart_path: Path | None = None,
    tcp_seconds: int | None = None,
) -> dict[str, Any]:
    """Run, print (table or JSON), and write the JSON and the chart where given. The shared
    body of ``btmm bench --e2e`` and ``python3 -m bench.e2e``."""
    from rich.console import Console

    unknown = [s for s in systems if s not in SYSTEMS]
    if unknown:
        raise BenchError(f"unknown systems {unknown}", hint=f"choose from {', '.join(SYSTEMS)}")
    durations = durations_for(quick, repetitions, tcp_seconds)
    runs = run_with_progress(systems, durations, transient=as_json)
    report = to_json(runs, systems, durations)
    text = json.dumps(report, indent=2)
    if output:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(text + "\n")
    if chart_path:
        chart_path.parent.mkdir(parents=True, exist_ok=True)
        chart(report, chart_path)
    if as_json:
        print(text)
    else:
        Console().print(table(report))
        for name, path in (("JSON", output), ("chart", chart_path)):
            if path:
                Console().print(f"{name}: {path}")
    return report


def cli_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The options of ``python3 -m bench.e2e`` (``btmm bench --e2e`` has --quick,
    --repetitions, --json and --systems of them)."""
    for option in reversed(
        [
            click.option("--systems", default="all", show_default=True,
                         help=f"Comma-separated subset of: {', '.join(SYSTEMS)}."),
            click.option("--quick", is_flag=True,
                         help="1 repetition, 1 s TCP runs, 2 short UDP probes: a smoke run."),
            click.option("--repetitions", type=click.IntRange(1, 50), default=None,
                         help=f"Interleaved rounds (default {FULL.repetitions}, "
                         f"{QUICK.repetitions} with --quick)."),
            click.option("--tcp-seconds", type=click.IntRange(1, 120), default=None,
                         help=f"Seconds per TCP run (default {FULL.tcp:g}, "
                         f"{QUICK.tcp:g} with --quick)."),
            click.option("--save", is_flag=True,
                         help="Write the published figures, bench/results/e2e.json and "
                         "e2e.png (tracked in git), unless --output/--chart say elsewhere."),
            click.option("--output", type=click.Path(dir_okay=False, path_type=Path),
                         default=None, help="Write the JSON report here."),
            click.option("--chart", "chart_path", type=click.Path(dir_okay=False, path_type=Path),
                         default=None, help="Draw the chart (PNG) here (needs matplotlib)."),
            click.option("--json", "as_json", is_flag=True,
                         help="Print the JSON report on stdout instead of the table."),
        ]
    ):  # fmt: skip
        fn = option(fn)
    return fn


@click.command("e2e")
@cli_options
def command(
    systems: str, quick: bool, repetitions: int | None, tcp_seconds: int | None, save: bool,
    output: Path | None, chart_path: Path | None, as_json: bool,
) -> None:  # fmt: skip
    """Measure iperf3 through btmm (both engines), wireguard-go and OpenVPN, beside plain
    veth, in two fresh network namespaces per run (needs root). Prints the report; writes
    files only with --save, --output or --chart."""
    if save and quick:
        # a smoke run must not overwrite the figures of a real one
        raise click.UsageError("--save publishes a figure; a --quick run is not one")
    if save:
        output = output or SAVED_JSON
        chart_path = chart_path or SAVED_CHART
    try:
        main(parse_systems(systems), quick, repetitions, as_json, output, chart_path,
             tcp_seconds)  # fmt: skip
    except BtmmError as err:
        raise click.ClickException(str(err)) from err


def script() -> None:
    """Entry point of ``python3 -m bench.e2e``."""
    command()
