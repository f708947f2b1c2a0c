"""``btmm netcheck``: ask the gateway for a UDP mapping and say what happened, in words; with
``--stun``, also ask STUN servers from one socket for this host's reflexive address and tell
whether the NAT's mapping depends on the destination (RFC 4787 section 4.1), like
``tailscale netcheck``."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from typing import Any

import click

from btmm_core.errors import PortMapError
from btmm_core.portmap.addresses import AddressKind, classify
from btmm_core.portmap.client import (
    DEFAULT_LIFETIME,
    PROTOCOLS,
    Mapping,
    MapResult,
    PortMapClient,
    default_gateway,
    local_address_towards,
)
from btmm_core.portmap.diagnosis import (
    Diagnosis,
    Outcome,
    Verdict,
    diagnose_external,
    diagnose_failure,
    diagnose_host,
)
from btmm_core.portmap.hops import DEFAULT_PROBE_TARGET, hop_address
from btmm_core.portmap.renewal import MappingEvent, MappingRenewal
from btmm_core.stun.client import BindingTransaction, MappingBehaviour, mapping_behaviour
from btmm_core.stun.driver import parse_servers, query, resolve

#: Where a user waits: requests at 0, 0.5, 1.5 and 3.5 s, given up at 5.5 s (RFC 8489's full
#: schedule waits 39.5 s).
STUN_TRIES = 4
STUN_LAST_WAIT = 4

MAPPING_TEXT = {
    MappingBehaviour.ENDPOINT_INDEPENDENT: "endpoint-independent (one public address and port "
    "for every destination: a hole punched towards one peer works for all)",
    MappingBehaviour.DEPENDS_ON_DESTINATION: "depends on destination (the NAT maps each "
    "destination to another public port: hole punching needs a relay or a port mapping)",
    MappingBehaviour.UNKNOWN: "unknown (needs answers from two server addresses, e.g. "
    "--stun HOST:3478,3479 with `btmm serve --stun-alt-port 3479`)",
    MappingBehaviour.NO_ANSWER: "no answer (UDP to the STUN server is blocked, or it is off)",
}


async def _stun_check(spec: str) -> tuple[dict[str, Any], int]:
    """Ask every server in ``spec`` from one socket: the JSON facts and an exit code (0 when
    every server answered)."""
    servers = [resolve(h, p) for h, p in parse_servers(spec)]
    local, txs = await query(servers, rc=STUN_TRIES, rm=STUN_LAST_WAIT)
    verdict = mapping_behaviour([tx.mapped for tx in txs])
    out: dict[str, Any] = {
        "local": f"{local[0]}:{local[1]}",
        "servers": [_stun_json(tx) for tx in txs],
        "mapping": verdict.value,
    }
    return out, 0 if all(tx.mapped is not None for tx in txs) else 1


def _stun_json(tx: BindingTransaction) -> dict[str, Any]:
    out: dict[str, Any] = {"server": str(tx.server)}
    if tx.mapped is not None:
        out["reflexive"] = str(tx.mapped)
        if tx.rtt is not None:
            out["rtt_ms"] = round(tx.rtt * 1000, 1)
    else:
        out["error"] = tx.error
    return out


def _print_stun(stun: dict[str, Any]) -> None:
    click.echo(f"stun socket:    {stun['local']}")
    for s in stun["servers"]:
        if "reflexive" in s:
            click.echo(f"stun server:    {s['server']} -> reflexive {s['reflexive']} "
                       f"({s.get('rtt_ms', 0):.0f} ms)")
        else:
            click.echo(f"stun server:    {s['server']} -> {s['error']}")
    click.echo(f"stun mapping:   {MAPPING_TEXT[MappingBehaviour(stun['mapping'])]}")


def _event_json(ev: MappingEvent) -> dict[str, Any]:
    m = ev.mapping
    out: dict[str, Any] = {"event": ev.kind.value, "reason": ev.reason}
    if m is not None:
        out.update(protocol=m.protocol, gateway=m.gateway, public_address=str(m.external_address),
                   external_port=m.external_port, internal=f"{m.internal_address}:"
                   f"{m.internal_port}", lifetime=m.lifetime,
                   remaining=round(m.remaining(time.monotonic())))
    if ev.diagnosis is not None:
        out["verdict"] = ev.diagnosis.verdict.value
    return out


async def _double_nat_probe(result: MapResult, probe: str) -> Diagnosis | None:
    """miniupnpd and many routers refuse to tell a private external address: look at hop 2.

    When the gateway maps nothing because it has no usable external address, a router in
    private or shared space right behind it means another NAT (RFC 6598 CGN or a second box).
    """
    refused = [a for a in result.attempts if a.outcome is Outcome.REFUSED]
    if not refused:
        return None
    hop = await hop_address(probe, ttl=2)
    if hop is None:
        return None
    kind = classify(hop)
    if kind not in (AddressKind.PRIVATE, AddressKind.SHARED):
        return None
    first = refused[0]
    return Diagnosis(Verdict.DOUBLE_NAT, f"double NAT: the gateway refuses to map "
                     f"({first.protocol}: {first.detail}) and the next router out, {hop}, has "
                     f"a {kind.value} address, so another NAT sits between the gateway and "
                     f"the internet; ask the outer router or ISP for a port forward, or use a "
                     f"relay")


async def _netcheck(gateway: str | None, port: int, protocols: tuple[str, ...], lifetime: int,
                    keep: bool, watch: float | None, as_json: bool, probe: str,
                    reboot_delay: float, stun_spec: str | None = None,
                    stun_only: bool = False) -> int:
    extra: dict[str, Any] = {}
    stun_code = 0
    if stun_spec is not None:
        extra["stun"], stun_code = await _stun_check(stun_spec)
        if not as_json:
            _print_stun(extra["stun"])
    if stun_only:
        if as_json:
            click.echo(json.dumps(extra))
        return stun_code
    return max(stun_code, await _gateway_check(gateway, port, protocols, lifetime, keep, watch,
                                               as_json, probe, reboot_delay, extra))


async def _gateway_check(gateway: str | None, port: int, protocols: tuple[str, ...],
                         lifetime: int, keep: bool, watch: float | None, as_json: bool,
                         probe: str, reboot_delay: float, extra: dict[str, Any]) -> int:
    gw = gateway or default_gateway()
    local = local_address_towards(gw) if gw else None
    pre = diagnose_host(local, gw)
    say = (lambda d: click.echo(json.dumps({**d, **extra}))) if as_json else None
    if pre is not None:
        if say:
            say({"verdict": pre.verdict.value, "diagnosis": pre.text, "gateway": gw,
                 "local_address": local})
        else:
            click.echo(f"gateway:        {gw or '-'}")
            click.echo(f"local address:  {local or '-'}")
            click.echo(f"diagnosis:      {pre.text}")
        return 0 if pre.verdict is Verdict.NO_NAT else 1
    assert gw is not None and local is not None
    client = PortMapClient(gw, local_address=local, protocols=protocols)
    if watch is not None:
        if say and extra:
            say({})
        return await _watch(client, port, lifetime, watch, reboot_delay)
    try:
        result = await client.map_udp(port, lifetime=lifetime)
        m = result.mapping
        diag = diagnose_external(m.external_address) if m is not None else None
        if m is None:
            diag = await _double_nat_probe(result, probe) or diagnose_failure(result.attempts)
        tried = ", ".join(f"{a.protocol}: {a.outcome.value}" for a in result.attempts)
        if say:
            out: dict[str, Any] = {"gateway": gw, "local_address": local, "tried": tried}
            if m is not None:
                out.update(protocol=m.protocol, public_address=str(m.external_address),
                           external_port=m.external_port, internal_port=m.internal_port,
                           lifetime=m.lifetime,
                           remaining=round(m.remaining(time.monotonic())))
            if diag is not None:
                out.update(verdict=diag.verdict.value, diagnosis=diag.text)
            else:
                out["verdict"] = Verdict.MAPPED.value
            say(out)
        else:
            _print_mapping(gw, local, tried, m, diag)
        if m is not None and not keep:
            try:
                await client.delete(m)
                if not say:
                    click.echo("                (mapping deleted again; --keep leaves it)")
            except PortMapError as exc:
                click.echo(f"warning: could not delete the mapping: {exc}", err=True)
        return 0 if m is not None and diag is None else 1
    finally:
        await client.close()


def _print_mapping(gw: str, local: str, tried: str, m: Mapping | None,
                   diag: Diagnosis | None) -> None:
    """The text form of ``btmm netcheck``'s result."""
    click.echo(f"gateway:        {gw}")
    click.echo(f"local address:  {local}")
    click.echo(f"tried:          {tried}")
    if m is not None:
        click.echo(f"protocol:       {m.protocol}")
        click.echo(f"public address: {m.external_address}")
        click.echo(f"mapping:        UDP {m.external_address}:{m.external_port} -> "
                   f"{m.internal_address}:{m.internal_port}")
        click.echo(f"lifetime:       {m.lifetime} s granted, "
                   f"{m.remaining(time.monotonic()):.0f} s remaining")
    if diag is not None:
        click.echo(f"diagnosis:      {diag.text}")
    elif m is not None:
        click.echo(f"result:         peers can reach UDP port {m.external_port} at "
                   f"{m.external_address}")


async def _watch(client: PortMapClient, port: int, lifetime: int, seconds: float,
                 reboot_delay: float) -> int:
    """Run the keep-alive renewal for ``seconds``, one JSON line per event."""
    renewal = MappingRenewal(client, port, lifetime=lifetime, reboot_delay_max=reboot_delay)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        # Stop cleanly so that the mapping is deleted on the gateway.
        loop.add_signal_handler(sig, stop.set)
    await renewal.start()
    deadline = time.monotonic() + seconds
    mapped = False
    try:
        while (left := deadline - time.monotonic()) > 0 and not stop.is_set():
            get = asyncio.ensure_future(renewal.events.get())
            stopped = asyncio.ensure_future(stop.wait())
            done, _ = await asyncio.wait({get, stopped}, timeout=left,
                                         return_when=asyncio.FIRST_COMPLETED)
            stopped.cancel()
            if get not in done:
                get.cancel()
                break
            ev = get.result()
            mapped = mapped or ev.mapping is not None
            click.echo(json.dumps(_event_json(ev)), nl=True)
    finally:
        await renewal.stop(delete=True)
        while not renewal.events.empty():
            click.echo(json.dumps(_event_json(renewal.events.get_nowait())))
    return 0 if mapped else 1


@click.command("netcheck")
@click.option("--gateway", help="gateway address (default: the IPv4 default route's)")
@click.option("--port", default=4500, show_default=True, type=click.IntRange(1, 65535),
              help="local UDP port to map (the same external port is asked for)")
@click.option("--protocol", "protocols", multiple=True, type=click.Choice(PROTOCOLS),
              help="protocols to try, in order (default: pcp, natpmp, upnp)")
@click.option("--lifetime", default=DEFAULT_LIFETIME, show_default=True,
              type=click.IntRange(1, 0xFFFFFFFF), help="mapping lifetime to ask for, seconds")
@click.option("--keep", is_flag=True, help="leave the mapping on the gateway")
@click.option("--watch", type=float, metavar="SECONDS",
              help="keep the mapping alive for SECONDS, printing one JSON line per event")
@click.option("--json", "as_json", is_flag=True, help="print JSON instead of text")
@click.option("--probe", default=DEFAULT_PROBE_TARGET, show_default=True,
              help="address for the TTL-2 probe that looks for a second NAT")
@click.option("--reboot-delay", default=5.0, show_default=True, type=float,
              help="with --watch: longest random wait before re-creating after a reboot")
@click.option("--stun", "stun_spec", metavar="HOST:PORT[,HOST:PORT2]",
              help="STUN server(s) to ask from one local socket: this host's reflexive address "
              "and, with two server addresses, whether the NAT maps per destination (a PORT "
              "alone reuses the host before it; `btmm serve` answers on 3478)")
@click.option("--stun-only", is_flag=True,
              help="with --stun: skip the gateway's mapping protocols")
def netcheck(gateway: str | None, port: int, protocols: tuple[str, ...], lifetime: int,
             keep: bool, watch: float | None, as_json: bool, probe: str,
             reboot_delay: float, stun_spec: str | None, stun_only: bool) -> None:
    """Show the gateway, the mapping protocol that worked, the public address and mapping;
    with --stun, the reflexive address and the NAT's mapping behaviour."""
    if stun_only and stun_spec is None:
        raise click.UsageError("--stun-only needs --stun HOST:PORT")
    if stun_spec is not None:
        try:
            parse_servers(stun_spec)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--stun") from exc
    try:
        code = asyncio.run(_netcheck(gateway, port, protocols or PROTOCOLS, lifetime, keep,
                                     watch, as_json, probe, reboot_delay, stun_spec, stun_only))
    except OSError as exc:
        if stun_spec is None:
            raise
        raise click.ClickException(f"STUN: {exc}") from exc
    except PortMapError as exc:
        raise click.ClickException(str(exc)) from exc
    raise SystemExit(code)
