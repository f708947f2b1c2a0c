"""Has the gateway lost its mapping state? The epoch rules of RFC 6886 §3.6 and RFC 6887 §8.5.

Both protocols carry the gateway's "seconds since start of epoch". NAT-PMP: the client expects
the previous value plus 7/8 of the time it saw elapse; an answer more than 2 s below that means
the gateway rebooted or lost its table. PCP: going backwards by more than 1 s is invalid, and so
is a server delta that disagrees with the client delta by more than 2 s plus 1/16 (clock drift).
Either way the client re-creates its mappings.
"""

from __future__ import annotations

import enum
import math


class EpochRule(enum.Enum):
    NATPMP = "natpmp"
    PCP = "pcp"


def natpmp_epoch_valid(prev_server: int, prev_client: float, server: int, now: float) -> bool:
    """RFC 6886 §3.6: valid unless ``server`` is > 2 s below prev + 7/8 of elapsed time."""
    expected = prev_server + (now - prev_client) * 7 / 8
    return server >= expected - 2


def pcp_epoch_valid(prev_server: int, prev_client: float, server: int, now: float) -> bool:
    """RFC 6887 §8.5, in whole seconds as the RFC's integer arithmetic implies."""
    if server < prev_server - 1:
        return False
    client_delta = math.floor(now - prev_client)
    server_delta = server - prev_server
    return not (
        client_delta + 2 < server_delta - server_delta // 16
        or server_delta + 2 < client_delta - client_delta // 16
    )


class EpochTracker:
    """Remembers the last epoch seen from one gateway; ``observe`` says if state was lost.

    A gateway that speaks both protocols has one epoch (its mapping table's age), so one
    tracker serves both; each observation may name the rule of the message it came in.
    """

    def __init__(self, rule: EpochRule) -> None:
        self.rule = rule
        self.prev_server: int | None = None
        self.prev_client: float | None = None

    def observe(self, server_epoch: int, now: float, rule: EpochRule | None = None) -> bool:
        """Record an answer's epoch; True when it shows the gateway lost its mappings."""
        lost = False
        if self.prev_server is not None and self.prev_client is not None:
            which = rule or self.rule
            check = natpmp_epoch_valid if which is EpochRule.NATPMP else pcp_epoch_valid
            lost = not check(self.prev_server, self.prev_client, server_epoch, now)
        self.prev_server = server_epoch
        self.prev_client = now
        return lost

    def reset(self) -> None:
        self.prev_server = None
        self.prev_client = None
