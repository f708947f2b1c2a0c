"""``btmm watch NAME TYPE``: print changes to an RRset as the registry pushes them, by
long-lived query (RFC 8764; over UDP, TCP or DNS over TLS) or by DNS Push (RFC 8765; over DNS
over TLS). A tool composed of the two clients, hence its own package above both."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import ssl
import sys
import time
from pathlib import Path
from typing import Any

import click
import dns.name
import dns.rdatatype

from btmm_core.dns.keyfile import read_key
from btmm_core.errors import BtmmError
from btmm_core.llq.client import Changes, ClientConfig, StateChanged
from btmm_core.llq.driver import TRANSPORTS, Watcher
from btmm_core.push import client as push_client
from btmm_core.push.driver import PushWatcher

Event = Changes | StateChanged | push_client.Changes | push_client.StateChanged


@click.command()
@click.argument("name")
@click.argument("rdtype", metavar="TYPE", default="ANY")
@click.option("--server", default="127.0.0.1", show_default=True, help="Registry address.")
@click.option(
    "--port",
    type=int,
    default=None,
    help="Registry port [default: 53, or 853 with --transport tls or push].",
)
@click.option(
    "--transport",
    type=click.Choice((*TRANSPORTS, "push")),
    default="udp",
    show_default=True,
    help="LLQ over UDP, TCP or DNS over TLS (over TCP/TLS the LLQ lives as long as the "
    "connection), or push: a DNS Push subscription (RFC 8765) on the DoT port.",
)
@click.option(
    "--tls-ca",
    type=click.Path(path_type=Path, exists=True, dir_okay=False),
    default=None,
    help="PEM file of the CA (or the registry's self-signed certificate) to trust for TLS.",
)
@click.option(
    "--tls-name",
    default=None,
    help="Name the registry's TLS certificate must carry [default: --server].",
)
@click.option(
    "-k",
    "--key-file",
    type=click.Path(path_type=Path, exists=True, dir_okay=False),
    default=None,
    help="Credentials file (BIND key statement) of the zone's user: user zones are private.",
)
@click.option("--lease", type=int, default=7200, show_default=True, help="Lease to ask for (s).")
@click.option(
    "--poll-interval",
    type=float,
    default=60.0,
    show_default=True,
    help="Seconds between plain queries while no LLQ can be set up.",
)
@click.option("--count", type=int, default=0, help="Exit after this many record lines (0: never).")
@click.option("--timeout", type=float, default=0.0, help="Exit after this many seconds (0: never).")
@click.option("--quiet", is_flag=True, help="No state lines on stderr.")
def watch(
    name: str,
    rdtype: str,
    server: str,
    port: int | None,
    transport: str,
    tls_ca: Path | None,
    tls_name: str | None,
    key_file: Path | None,
    lease: int,
    poll_interval: float,
    count: int,
    timeout: float,
    quiet: bool,
) -> None:
    """Watch NAME's TYPE records: one line per change, "+ RR" added, "- RR" removed.

    The first lines are the current records (as additions). State changes (established,
    polling because the server cannot be reached, ...) go to stderr as "# ..." lines.
    """
    try:
        qname = dns.name.from_text(name)
        qtype = dns.rdatatype.from_text(rdtype)
        key = read_key(key_file) if key_file is not None else None
        config = ClientConfig(lease=lease, poll_interval=poll_interval)
        ssl_context = None
        if transport in ("tls", "push"):
            ssl_context = ssl.create_default_context(cafile=str(tls_ca) if tls_ca else None)
    except ssl.SSLError as e:
        raise click.UsageError(f"cannot load the TLS trust anchor {tls_ca}: {e}") from e
    except BtmmError as e:
        raise click.ClickException(str(e)) from e
    except (ValueError, dns.exception.DNSException) as e:
        raise click.UsageError(str(e)) from e

    async def main() -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        end = time.monotonic() + timeout if timeout > 0 else None
        tls_port = transport in ("tls", "push")
        address = (server, port if port is not None else 853 if tls_port else 53)
        w: Watcher | PushWatcher
        if transport == "push":
            w = PushWatcher(
                address,
                qname,
                qtype,
                key=key,
                ssl_context=ssl_context,
                server_hostname=tls_name or server,
            )
        else:
            w = Watcher(
                address,
                qname,
                qtype,
                key=key,
                config=config,
                transport=transport,
                ssl_context=ssl_context,
                server_hostname=tls_name or server,
            )
        async with w:
            await _print_events(w.events, stop, end, count, quiet)
        return 0

    sys.exit(asyncio.run(main()))


async def _print_events(
    events: asyncio.Queue[Any], stop: asyncio.Event, end: float | None, count: int, quiet: bool
) -> None:
    """Print ``events`` until ``stop`` is set, ``end`` passes or ``count`` record lines."""
    printed = 0
    while not stop.is_set():
        wait = None if end is None else end - time.monotonic()
        if wait is not None and wait <= 0:
            break
        event = await _next_event(events, stop, wait)
        if event is None:
            continue
        printed += _print_event(event, quiet)
        if count and printed >= count:
            break


async def _next_event(
    events: asyncio.Queue[Any], stop: asyncio.Event, wait: float | None
) -> Event | None:
    """The next event, or None when ``stop`` is set or ``wait`` seconds pass first."""
    get = asyncio.ensure_future(events.get())
    halt = asyncio.ensure_future(stop.wait())
    done, _ = await asyncio.wait({get, halt}, timeout=wait, return_when="FIRST_COMPLETED")
    halt.cancel()
    if get not in done:
        get.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await get
        return None
    event: Event = get.result()
    return event


def _print_event(event: Event, quiet: bool) -> int:
    """Print a state line on stderr or the record lines on stdout; returns the record lines."""
    if isinstance(event, StateChanged | push_client.StateChanged):
        if not quiet:
            print(f"# {event.state.value}: {event.why}", file=sys.stderr, flush=True)
        return 0
    for r in event.removed:
        print(f"- {r.to_text()}", flush=True)
    for r in event.added:
        print(f"+ {r.to_text()}", flush=True)
    return len(event.removed) + len(event.added)
