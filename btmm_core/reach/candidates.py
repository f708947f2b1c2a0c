"""Endpoint candidates of a host (the model shared by gathering, pairing and path selection).

Family-neutral: an endpoint's host may be IPv4 or IPv6 text. Preference order for path
selection: LAN > IPV6 > MAPPED > REFLEXIVE (punched) > RELAY, the order of the values.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from btmm_core.dataplane.api import Endpoint


class CandidateKind(enum.IntEnum):
    LAN = 1
    IPV6 = 2
    MAPPED = 3
    REFLEXIVE = 4
    RELAY = 5


@dataclass(frozen=True)
class Candidate:
    kind: CandidateKind
    endpoint: Endpoint
