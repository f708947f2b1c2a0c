"""Signed DNS exchanges with the registry (UPDATE, RFC 2136; queries; TSIG, RFC 8945).

A thin asyncio driver: builds nothing itself (see ``records``), signs each try afresh (a new
Time Signed and MAC: a resent MAC would be refused as a replay), sends it over UDP with bounded
retries (the wait for an answer doubles with each try, as resolvers back off: a registry too
busy to answer in time is not sent more; TCP when the answer is truncated, or at once when the
request itself is larger than ``UDP_REQUEST_MAX``), checks the answer's TSIG itself (dns/tsig.py)
and turns the common failures into errors that say what to do. Checking the TSIG here rather
than in dnspython keeps the signed fields of an error answer: a BADTIME answer carries the
registry's clock in its Other Data (RFC 8945 section 5.2.3), which ``ClockSkew.skew`` reports.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import socket
import struct
import time

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdatatype
import dns.rrset

from btmm_core.aio import within
from btmm_core.dns.tsig import MAX_FUDGE, TsigError, TsigKey, expected_mac, record_of, sign
from btmm_core.errors import ClockSkew, CredentialsRejected, RegistryError, RegistryUnreachable

#: seconds of clock difference from the registry (read from a BADTIME answer) within which a
#: BADTIME is taken for our own requests crossing (see ``exchange_signed``)
SAME_CLOCK = 2

#: the largest request sent over UDP: the EDNS buffer size every resolver accepts without IP
#: fragmentation (DNS flag day 2020); a larger one (an UPDATE with many candidates) goes by TCP
UDP_REQUEST_MAX = 1232
#: a DNS message over TCP (RFC 1035 section 4.2.2: a two-byte length)
MAX_MESSAGE = 65535

#: RRsets of a response by owner and type (``RegistryClient.query_sets``)
RRsets = dict[tuple[dns.name.Name, int], dns.rrset.RRset]

REJOIN = (
    "this device was revoked or its key is wrong: run `btmm join` again (with an invite from "
    "`btmm serve user invite` or the account key)"
)


def _wire(msg: dns.message.Message) -> bytes:
    # dnspython would cap the request at our own EDNS payload size, which bounds the answer
    return msg.to_wire(max_size=MAX_MESSAGE)


def _fmt(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t))


class _Inbox(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.queue: asyncio.Queue[tuple[bytes, tuple[str, int]]] = asyncio.Queue()

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.queue.put_nowait((data, addr))

    def error_received(self, exc: Exception) -> None:
        pass  # ICMP unreachable: the timeout decides


class RegistryClient:
    """Talks to one registry address with one key (this device's)."""

    def __init__(
        self,
        server: tuple[str, int],
        key: TsigKey,
        *,
        timeout: float = 2.0,
        tries: int = 3,
        source: str | None = None,
    ) -> None:
        self.server = server
        self.key = key
        self.timeout = timeout
        self.tries = tries
        self.source = source
        self.last_ok: float | None = None
        self.last_error: str | None = None
        #: seconds the registry's clock is ahead of ours, from the last BADTIME (None: fine)
        self.clock_skew: float | None = None
        #: answers dropped because their TSIG did not check (forged or mangled)
        self.bad_answers = 0
        #: exchanges that ended in an error (unreachable, refused, an error rcode)
        self.failures = 0

    async def exchange(self, msg: dns.message.Message) -> dns.message.Message:
        resp, _ = await self.exchange_signed(msg)
        return resp

    async def exchange_signed(
        self, msg: dns.message.Message, *, check_rcode: bool = True, tcp: bool = False
    ) -> tuple[dns.message.Message, bytes]:
        """Send ``msg`` signed with our key; the verified answer and the request's MAC.

        ``tcp``: over TCP only (for a request that must not be sent twice, e.g. enrolment).
        """
        host, port = self.server
        last: Exception | None = None
        rejected: CredentialsRejected | None = None
        signed_again = False
        tries = self.tries
        wait = self.timeout
        while tries > 0:
            tries -= 1
            now = int(time.time())
            signed, mac = sign(_wire(msg), self.key, time_signed=now, fudge=MAX_FUDGE)
            try:
                if tcp or len(signed) > UDP_REQUEST_MAX:
                    resp = await self._tcp(signed, msg, mac, now)
                    break
                resp = await self._udp(signed, msg, mac, now, wait)
                if resp.flags & dns.flags.TC:
                    msg.id = (msg.id + 1) & 0xFFFF  # a new MAC: the UDP one is spent
                    now = int(time.time())
                    signed, mac = sign(_wire(msg), self.key, time_signed=now, fudge=MAX_FUDGE)
                    resp = await self._tcp(signed, msg, mac, now)
                break
            except CredentialsRejected as exc:
                # BADKEY/BADSIG answers are unsigned (RFC 8945 5.3.2): anyone who can spoof
                # the registry's address could send one, so one alone is not believed
                rejected = exc
                continue
            except ClockSkew as exc:
                if exc.skew is None or abs(exc.skew) > SAME_CLOCK or signed_again:
                    raise
                # Our clock agrees with the registry's, so the newer Time Signed it holds for
                # our key is most likely our own: a request another task signed a second
                # later got there first, and the replay rule refuses an older time. Signed
                # again in the next second, once (a new ID: a new MAC)
                signed_again = True
                tries += 1  # refused before it was looked at: not a try
                msg.id = (msg.id + 1) & 0xFFFF
                await asyncio.sleep(1.0 - time.time() % 1.0 + 0.01)
                continue
            except (TimeoutError, OSError, asyncio.IncompleteReadError) as exc:
                last = exc
                wait *= 2
                continue
        else:
            if rejected is not None:
                raise rejected
            raise self._fail(RegistryUnreachable(
                f"no answer from the registry at {host}:{port} after {self.tries} tries "
                f"({type(last).__name__}: {last})",
                hint="check the server address in the config and that `btmm serve` runs and "
                "is reachable (UDP and TCP)",
            ))
        rcode = resp.rcode()
        if check_rcode:
            if rcode in (dns.rcode.NOTAUTH, dns.rcode.REFUSED) and \
                    msg.opcode() == dns.opcode.UPDATE:
                zone = msg.question[0].name if msg.question else "?"
                raise self._fail(RegistryError(
                    f"the registry refused our update to {zone} ({dns.rcode.to_text(rcode)})",
                    hint="this device's key may change only its own names (another device may "
                    "hold one of them); the registry's log says which name",
                ))
            if rcode not in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN):
                raise self._fail(RegistryError(
                    f"the registry answered {dns.rcode.to_text(rcode)} to "
                    f"{dns.opcode.to_text(msg.opcode())}"))
        self.last_ok = time.time()
        self.last_error = None
        self.clock_skew = None
        return resp, mac

    def _fail(self, err: RegistryError) -> RegistryError:
        self.last_error = str(err)
        self.failures += 1
        return err

    # -- answers ------------------------------------------------------------------------

    def _answer(
        self, data: bytes, msg: dns.message.Message, mac: bytes, sent: int
    ) -> dns.message.Message | None:
        """The verified answer to ``msg``; None for a datagram that is not it (ignored)."""
        host, port = self.server
        try:
            resp = dns.message.from_wire(data, keyring=False)
        except Exception:  # not a DNS answer at all
            self.bad_answers += 1
            return None
        if resp.id != msg.id or not resp.flags & dns.flags.QR:
            return None
        if resp.tsig is None:
            self.bad_answers += 1
            return None
        rec = record_of(data, resp)
        if rec.error == TsigError.BADKEY:
            raise self._fail(CredentialsRejected(
                f"the registry at {host}:{port} does not know our key {self.key.name} (BADKEY)",
                hint=REJOIN,
            ))
        if rec.error == TsigError.BADSIG:
            raise self._fail(CredentialsRejected(
                f"the registry at {host}:{port} refused our signature with key {self.key.name} "
                "(BADSIG)",
                hint=REJOIN,
            ))
        if not hmac.compare_digest(expected_mac(self.key, data, rec, request_mac=mac), rec.mac):
            self.bad_answers += 1  # not from the registry, or mangled: keep waiting
            return None
        if rec.error == TsigError.BADTIME:
            server = None
            if len(rec.other) == 6:
                hi, lo = struct.unpack("!HI", rec.other)
                server = (hi << 32) | lo
            skew = None if server is None else float(server - sent)
            self.clock_skew = skew
            if skew is None:
                what = "the registry refused our signing time (BADTIME)"
            else:
                ahead = "behind" if skew > 0 else "ahead of"
                what = (f"the registry refused our signing time (BADTIME): this host's clock "
                        f"({_fmt(sent)}) is {abs(skew):.0f} s {ahead} the registry's "
                        f"({_fmt(server or 0)})")
                if abs(skew) <= MAX_FUDGE:
                    what += "; or a request of ours was stamped later than this one"
            raise self._fail(ClockSkew(
                what, hint="set the clock (NTP: `timedatectl set-ntp true`); the daemon "
                "keeps retrying", skew=skew,
            ))
        if rec.error != TsigError.NOERROR:
            raise self._fail(RegistryError(
                f"the registry answered with TSIG error {rec.error} to our request"))
        if abs(rec.time_signed - int(time.time())) > 2 * MAX_FUDGE:
            self.bad_answers += 1  # an old signed answer replayed
            return None
        return resp

    def _matches(self, addr: tuple[str, int]) -> bool:
        host, port = self.server
        try:
            return ipaddress.ip_address(addr[0]) == ipaddress.ip_address(host) and \
                addr[1] == port
        except ValueError:
            return addr[0] == host and addr[1] == port

    async def _udp(
        self, wire: bytes, msg: dns.message.Message, mac: bytes, sent: int, wait: float
    ) -> dns.message.Message:
        loop = asyncio.get_running_loop()
        host, port = self.server
        local = (self.source, 0) if self.source else None
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        transport, proto = await loop.create_datagram_endpoint(
            _Inbox, local_addr=local, family=family)
        try:
            transport.sendto(wire, (host, port))
            deadline = loop.time() + wait
            while True:
                left = deadline - loop.time()
                if left <= 0:
                    raise TimeoutError("no answer")
                data, addr = await within(proto.queue.get(), left)
                if not self._matches(addr):
                    continue
                resp = self._answer(data, msg, mac, sent)
                if resp is not None:
                    return resp
        finally:
            transport.close()

    async def _tcp(
        self, wire: bytes, msg: dns.message.Message, mac: bytes, sent: int
    ) -> dns.message.Message:
        host, port = self.server
        reader, writer = await within(asyncio.open_connection(host, port), self.timeout)
        try:
            writer.write(struct.pack("!H", len(wire)) + wire)
            await within(writer.drain(), self.timeout)
            while True:
                (n,) = struct.unpack("!H", await within(reader.readexactly(2), self.timeout))
                data = await within(reader.readexactly(n), self.timeout)
                resp = self._answer(data, msg, mac, sent)
                if resp is not None:
                    return resp
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def query_sets(self, name: dns.name.Name, rdtype: int) -> RRsets:
        """The answer's and the additional section's RRsets by owner and type: ANY reads
        every type at ``name`` in one exchange, and the registry sends an SRV answer's
        targets' addresses along (EDNS lets them fit, up to ``UDP_REQUEST_MAX``). Whether
        an owner is one to trust is the caller's question."""
        q = dns.message.make_query(name, dns.rdatatype.RdataType.make(rdtype), use_edns=0,
                                   payload=UDP_REQUEST_MAX)
        resp = await self.exchange(q)
        return {(r.name, r.rdtype): r for r in (*resp.answer, *resp.additional)}

    async def query(self, name: dns.name.Name, rdtype: int) -> dns.rrset.RRset | None:
        q = dns.message.make_query(name, dns.rdatatype.RdataType.make(rdtype))
        resp = await self.exchange(q)
        for rrset in resp.answer:
            if rrset.name == name and rrset.rdtype == rdtype:
                return rrset
        return None
