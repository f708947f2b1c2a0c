"""Signed DNS exchanges with the registry (UPDATE, RFC 2136; queries; TSIG, RFC 8945).

A thin asyncio driver: builds nothing itself (see ``records``), sends one message over UDP with
bounded retries (TCP when the answer is truncated), checks the TSIG of the answer and turns the
common failures into errors that say what to do.
"""

from __future__ import annotations

import time

import dns.asyncquery
import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdatatype
import dns.rrset
import dns.tsig

from btmm_core.errors import ClockSkew, CredentialsRejected, RegistryError, RegistryUnreachable
from btmm_core.registry.tsig import HMAC_MD5, TsigKey


def dns_key(key: TsigKey) -> dns.tsig.Key:
    alg = dns.tsig.HMAC_MD5 if key.algorithm == HMAC_MD5 else dns.tsig.HMAC_SHA256
    return dns.tsig.Key(key.name, key.secret, alg)


class RegistryClient:
    """Talks to one registry address with one user's key."""

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
        self.key = dns_key(key)
        self.timeout = timeout
        self.tries = tries
        self.source = source
        self.last_ok: float | None = None
        self.last_error: str | None = None

    async def exchange(self, msg: dns.message.Message) -> dns.message.Message:
        msg.use_tsig(self.key)
        host, port = self.server
        last: Exception | None = None
        for _ in range(self.tries):
            try:
                resp = await dns.asyncquery.udp(
                    msg, host, timeout=self.timeout, port=port, source=self.source
                )
                if resp.flags & dns.flags.TC:
                    resp = await dns.asyncquery.tcp(msg, host, timeout=self.timeout, port=port)
                break
            except dns.tsig.PeerBadKey as exc:
                raise self._fail(CredentialsRejected(
                    f"the registry at {host}:{port} does not know our key {self.key.name} "
                    "(BADKEY)",
                    hint="the key was rotated or removed: get a new credentials file "
                    "(`btmm serve user rotate-key`) and run `btmm join` again",
                )) from exc
            except (dns.tsig.PeerBadSignature, dns.tsig.BadSignature) as exc:
                raise self._fail(CredentialsRejected(
                    f"the registry at {host}:{port} refused our signature (BADSIG)",
                    hint="the credentials file does not match the registry's key; copy it "
                    "again and run `btmm join`",
                )) from exc
            except (dns.tsig.PeerBadTime, dns.tsig.PeerBadTruncation) as exc:
                raise self._fail(ClockSkew(
                    f"the registry at {host}:{port} refused our signing time (BADTIME): this "
                    f"host's clock ({time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}) "
                    "differs from the server's by more than the allowed fudge",
                    hint="set the clock (NTP: `timedatectl set-ntp true`)",
                )) from exc
            except (dns.exception.Timeout, OSError) as exc:
                last = exc
                continue
            except dns.exception.DNSException as exc:
                raise self._fail(RegistryError(
                    f"unusable answer from the registry at {host}:{port}: {exc}")) from exc
        else:
            raise self._fail(RegistryUnreachable(
                f"no answer from the registry at {host}:{port} after {self.tries} tries "
                f"({type(last).__name__}: {last})",
                hint="check the server address in the config and that `btmm serve` runs and "
                "is reachable (UDP and TCP)",
            ))
        rcode = resp.rcode()
        if rcode in (dns.rcode.NOTAUTH, dns.rcode.REFUSED) and msg.opcode() == dns.opcode.UPDATE:
            zone = msg.question[0].name if msg.question else "?"
            raise self._fail(CredentialsRejected(
                f"the registry refused our update to {zone} ({dns.rcode.to_text(rcode)})",
                hint="the credentials file belongs to another zone, or the names are reserved",
            ))
        if rcode not in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN):
            raise self._fail(RegistryError(
                f"the registry answered {dns.rcode.to_text(rcode)} to "
                f"{dns.opcode.to_text(msg.opcode())}"))
        self.last_ok = time.time()
        self.last_error = None
        return resp

    def _fail(self, err: RegistryError) -> RegistryError:
        self.last_error = str(err)
        return err

    async def query(self, name: dns.name.Name, rdtype: int) -> dns.rrset.RRset | None:
        q = dns.message.make_query(name, dns.rdatatype.RdataType.make(rdtype))
        resp = await self.exchange(q)
        for rrset in resp.answer:
            if rrset.name == name and rrset.rdtype == rdtype:
                return rrset
        return None
