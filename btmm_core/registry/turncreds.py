"""TURN credentials for devices, served beside the registry (a plug-in, ``registry/plugin.py``).

A device that needs a relay asks ``_turn-credentials.<its name>.<its zone>`` TXT with the option
of ``dns/turn_option.py``, signed with its own device key. The answer is a ``TurnOffer`` for
the TURN server the operator configured (``btmm serve --turn-server``): username
``"<expiry>:<device>.<zone>"`` and the password coturn's ``use-auth-secret`` recomputes from the
secret both share (``stun/turn.py``). The secret never leaves this process; an offer dies by
itself at its expiry.

Refused (REFUSED, counted in ``stats`` by reason): an unsigned request, a key that is not a
device key (the account key, an invite), a name other than the signer's own, a question that is
not one IN TXT query. TSIG failures never get here: the registry core answers them first.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import dns.flags
import dns.message
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

from btmm_core.dns.tsig import KeyRole, TsigKey
from btmm_core.dns.turn_option import TURN_CREDENTIALS_CODE, credentials_name
from btmm_core.registry.handler import RequestContext, Transport
from btmm_core.registry.model import RRsetChange
from btmm_core.registry.plugin import Outgoing
from btmm_core.stun.turn import TurnOffer


@dataclass(frozen=True)
class TurnConfig:
    host: str
    port: int
    secret: bytes
    #: seconds an offer is valid
    lifetime: int = 86400

    def __post_init__(self) -> None:
        if not self.secret:
            raise ValueError("the TURN secret is empty")
        if not 60 <= self.lifetime <= 30 * 86400:
            raise ValueError(f"--turn-credential-lifetime {self.lifetime}: 60 s .. 30 days")


class TurnCredentials:
    option_codes: tuple[int, ...] = (TURN_CREDENTIALS_CODE,)
    dso = False

    def __init__(self, config: TurnConfig) -> None:
        self.config = config
        #: offers made, and refusals by reason
        self.stats: Counter[str] = Counter()

    def offer_for(self, key: TsigKey, now: float) -> TurnOffer:
        c = self.config
        name = f"{key.device}.{key.zone.to_text(omit_final_dot=True)}"
        return TurnOffer.make(c.host, c.port, c.secret, name, int(now) + c.lifetime)

    def receive(self, ctx: RequestContext) -> dns.message.Message | None:
        request = ctx.request
        response = dns.message.make_response(request)
        refusal = self._refusal(ctx)
        if refusal is not None:
            self.stats[refusal] += 1
            response.set_rcode(dns.rcode.REFUSED)
            return response
        assert ctx.key is not None
        offer = self.offer_for(ctx.key, ctx.now)  # the core's wall clock (TSIG's)
        rrset = dns.rrset.from_text_list(
            request.question[0].name, 0, dns.rdataclass.IN, dns.rdatatype.TXT,
            [" ".join(f'"{s}"' for s in offer.to_txt())])
        response.answer.append(rrset)
        response.flags |= dns.flags.AA
        self.stats["issued"] += 1
        return response

    @staticmethod
    def _refusal(ctx: RequestContext) -> str | None:
        request, key = ctx.request, ctx.key
        if request.opcode() != dns.opcode.QUERY or len(request.question) != 1:
            return "not a query"
        q = request.question[0]
        if q.rdtype != dns.rdatatype.TXT or q.rdclass != dns.rdataclass.IN:
            return "not a query"
        if key is None:
            return "unsigned"
        if key.role != KeyRole.DEVICE or key.device is None:
            return "not a device key"
        if q.name != credentials_name(key.device, key.zone):
            return "another name"
        return None

    # ---- the rest of the plug-in protocol: nothing to do ----------------------------------

    def receive_response(self, wire: bytes, now: float, transport: Transport,
                         peer: str) -> list[Outgoing]:
        return []

    def receive_message(self, wire: bytes, now: float, transport: Transport,
                        peer: str) -> list[Outgoing]:
        return []

    def on_signed(self, transport: Transport, peer: str, key: TsigKey, now: float) -> None:
        return None

    def on_changes(self, changes: Sequence[RRsetChange], now: float) -> list[Outgoing]:
        return []

    def connection_closed(self, transport: Transport, peer: str) -> int:
        return 0

    def holds_connection(self, transport: Transport, peer: str) -> bool:
        return False

    def next_deadline(self) -> float | None:
        return None

    def tick(self, now: float) -> list[Outgoing]:
        return []
