"""The ``btmm`` command line. Each feature keeps its commands in its own module."""

from __future__ import annotations

import importlib

import click

from btmm_core import __version__

# (module, attribute): each attribute is a click command or group added to ``btmm``.
_COMMANDS: tuple[tuple[str, str], ...] = (
    ("btmm_core.dataplane.bench", "bench"),
    ("btmm_core.dataplane.runner", "tunnel"),
    ("btmm_core.serve.cli", "serve"),
    ("btmm_core.llq.cli", "watch"),
    ("btmm_core.portmap.cli", "netcheck"),
    ("btmm_core.daemon.cli", "join"),
    ("btmm_core.daemon.cli", "up"),
    ("btmm_core.daemon.cli", "status"),
    ("btmm_core.lab.world", "lab"),
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="btmm")
def btmm() -> None:
    """btmm: your machines find each other through DNS and talk over encrypted tunnels."""


for _module, _attr in _COMMANDS:
    btmm.add_command(getattr(importlib.import_module(_module), _attr))


def main() -> None:
    btmm()


if __name__ == "__main__":  # `python3 -m btmm_core.cli` (the tests run commands this way)
    main()
