"""UPnP IGD port mapping through async-upnp-client (the draft's alternative to NAT-PMP).

SSDP search from the LAN address for an InternetGatewayDevice, then the WANIPConnection (or
WANPPPConnection) service's GetExternalIPAddress and AddPortMapping actions. Only a device on the
gateway's own address is accepted: another UPnP device on the LAN is not our NAT.
"""

from __future__ import annotations

import ipaddress
from typing import Any
from urllib.parse import urlparse

from async_upnp_client.aiohttp import AiohttpRequester
from async_upnp_client.client import UpnpDevice, UpnpService
from async_upnp_client.client_factory import UpnpFactory
from async_upnp_client.exceptions import UpnpError
from async_upnp_client.search import async_search

from btmm_core.errors import GatewayNotAnswering, MappingRefused

IGD_TYPES = (
    "urn:schemas-upnp-org:device:InternetGatewayDevice:2",
    "urn:schemas-upnp-org:device:InternetGatewayDevice:1",
)
SERVICE_TYPES = (
    "urn:schemas-upnp-org:service:WANIPConnection:2",
    "urn:schemas-upnp-org:service:WANIPConnection:1",
    "urn:schemas-upnp-org:service:WANPPPConnection:1",
)
DESCRIPTION = "btmm"


def _find_service(device: UpnpDevice) -> UpnpService | None:
    for dev in [device, *device.all_devices]:
        for stype in SERVICE_TYPES:
            if dev.has_service(stype):
                return dev.service(stype)
    return None


class UpnpIgd:
    def __init__(self, requester: AiohttpRequester, device: UpnpDevice,
                 service: UpnpService) -> None:
        self.requester = requester
        self.device = device
        self.service = service

    @classmethod
    async def discover(cls, local_address: str, timeout: float, gateway: str) -> UpnpIgd:
        """Find the gateway's IGD by SSDP within ``timeout`` seconds (one search)."""
        locations: list[str] = []

        async def found(headers: Any) -> None:
            location = headers.get("location") or headers.get("LOCATION")
            if location and urlparse(location).hostname == gateway:
                locations.append(location)

        await async_search(found, timeout=max(1, int(timeout)),
                           search_target=IGD_TYPES[1], source=(local_address, 0))
        if not locations:
            raise GatewayNotAnswering(f"no UPnP IGD answered an SSDP search from "
                                      f"{local_address} within {timeout:g} s")
        requester = AiohttpRequester(timeout=5)
        try:
            device = await UpnpFactory(requester).async_create_device(locations[0])
        except (UpnpError, OSError) as exc:
            raise GatewayNotAnswering(f"UPnP IGD description at {locations[0]} unreadable: "
                                      f"{exc}") from exc
        service = _find_service(device)
        if service is None:
            raise GatewayNotAnswering(f"UPnP device at {locations[0]} has no WAN connection "
                                      f"service")
        return cls(requester, device, service)

    async def _call(self, action: str, **args: Any) -> dict[str, Any]:
        try:
            result = await self.service.action(action).async_call(**args)
        except UpnpError as exc:
            raise MappingRefused(f"UPnP {action}: {exc}") from exc
        return dict(result)

    async def external_address(self) -> ipaddress.IPv4Address:
        out = await self._call("GetExternalIPAddress")
        try:
            return ipaddress.IPv4Address(out.get("NewExternalIPAddress") or "")
        except ValueError:
            raise MappingRefused("UPnP gateway reports no external address") from None

    async def add_udp_mapping(self, internal_port: int, external_port: int,
                              internal_client: str, lifetime: int) -> int:
        """Map ``external_port`` to us; returns it (AddPortMapping grants exactly it or fails).

        IGD v2's AddAnyPortMapping would let the gateway choose another port, but
        async-upnp-client rejects miniupnpd 2.3.1's answer to it ("unknown argument:
        NewReservedPort"), so only the v1 action is used.
        """
        await self._call(
            "AddPortMapping", NewRemoteHost="", NewExternalPort=external_port,
            NewProtocol="UDP", NewInternalPort=internal_port, NewInternalClient=internal_client,
            NewEnabled=True, NewPortMappingDescription=DESCRIPTION, NewLeaseDuration=lifetime,
        )
        return external_port

    async def delete_udp_mapping(self, external_port: int) -> None:
        await self._call("DeletePortMapping", NewRemoteHost="", NewExternalPort=external_port,
                         NewProtocol="UDP")

    async def close(self) -> None:
        # AiohttpRequester opens a session per request: nothing stays open between calls.
        return None
