"""The ``btmm`` command line. Each feature keeps its commands in its own module."""

from __future__ import annotations

import importlib

import click

from btmm_core import __version__

# (module, attribute): each attribute is a click command or group added to ``btmm``.
_COMMANDS: tuple[tuple[str, str], ...] = (
    ("btmm_core.dataplane.cli", "tunnel"),
    ("btmm_core.serve.cli", "serve"),
    ("btmm_core.llq.cli", "watch"),
    ("btmm_core.portmap.cli", "netcheck"),
    ("btmm_core.daemon.cli", "join"),
    ("btmm_core.daemon.cli", "up"),
    ("btmm_core.daemon.cli", "status"),
    ("btmm_core.daemon.cli", "ssh_cert"),
    ("btmm_core.lab.world", "lab"),
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="btmm")
def btmm() -> None:
    """btmm: your machines find each other through DNS and talk over encrypted tunnels."""


for _module, _attr in _COMMANDS:
    btmm.add_command(getattr(importlib.import_module(_module), _attr))


@btmm.command(
    context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
    add_help_option=False,
)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
@click.pass_context
def bench(ctx: click.Context, args: tuple[str, ...]) -> None:
    """Benchmarks: the ESP codec per engine, or tunnels end to end with --e2e (developer tool:
    runs from a source checkout)."""
    # The benchmarks are the top-level ``bench`` package of a source checkout, not part of the
    # installed wheel (bench/__init__.py says why); runtime code never imports them, so this
    # command is the one place that does, and only when it runs.
    try:
        from bench.codec import bench as command
    except ModuleNotFoundError as err:
        if err.name not in ("bench", "bench.codec"):
            raise  # a dependency of the benchmarks is missing: say which
        raise click.ClickException(
            "btmm bench runs from a source checkout: the benchmarks are not part of the "
            "installed package. Clone the repository, run ./scripts/setup there (an editable "
            "install that puts the checkout on Python's path), then `btmm bench` or "
            "`python3 -m bench.codec`."
        ) from None
    # Parsed (and --help answered) by the real command, under the name `btmm bench`.
    with command.make_context(ctx.info_name, list(args), parent=ctx.parent) as sub:
        command.invoke(sub)


def main() -> None:
    btmm()


if __name__ == "__main__":  # `python3 -m btmm_core.cli` (the tests run commands this way)
    main()
