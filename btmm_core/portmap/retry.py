"""Retransmission of one request to one gateway, sans-I/O.

NAT-PMP (RFC 6886 §3.1): first retry after 250 ms, the interval doubling each time, 9 tries in
all. PCP (RFC 6887 §8.1.1): initial 3 s, doubling with a random factor of ±10 %, capped at
1024 s. PCP lets a client retry forever; we bound the count (house rule: every sending loop is
bounded), and the caller decides what running out means.

The ``Exchange`` opens no socket and reads no clock: the driver passes ``now`` and received
datagrams in, and sends what comes out. Randomness (the PCP jitter) comes in as a callable.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from btmm_core.errors import MalformedMessage

T = TypeVar("T")


@dataclass(frozen=True)
class RetrySchedule:
    """When to retransmit: ``initial`` s, then doubling, at most ``max_tries`` transmissions."""

    initial: float
    max_tries: int
    max_interval: float | None = None
    jitter: float = 0.0

    def interval(self, attempt: int, rand: float = 0.5) -> float:
        """Wait after transmission number ``attempt`` (0-based); ``rand`` is uniform in [0, 1)."""
        base = self.initial * 2.0**attempt
        if self.max_interval is not None:
            base = min(base, self.max_interval)
        return base * (1.0 + self.jitter * (2.0 * rand - 1.0))


NATPMP_SCHEDULE = RetrySchedule(initial=0.25, max_tries=9)
PCP_SCHEDULE = RetrySchedule(initial=3.0, max_tries=4, max_interval=1024.0, jitter=0.1)


class ExchangeState(enum.Enum):
    IDLE = "idle"
    WAITING = "waiting"
    DONE = "done"
    EXHAUSTED = "exhausted"


class Exchange(Generic[T]):
    """One request, its retransmissions, and the one answer accepted for it.

    ``parse`` turns a datagram into an answer, returns None for a datagram that is valid but
    not ours (another opcode, another nonce), or raises ``MalformedMessage``. Datagrams from any
    address but ``server`` are ignored without being parsed.
    """

    def __init__(
        self,
        request: bytes,
        server: tuple[str, int],
        parse: Callable[[bytes], T | None],
        schedule: RetrySchedule,
        rand: Callable[[], float] = lambda: 0.5,
    ) -> None:
        self.request = request
        self.server = server
        self._parse = parse
        self.schedule = schedule
        self._rand = rand
        self.state = ExchangeState.IDLE
        self.tries = 0
        self._deadline: float | None = None
        self.answer: T | None = None
        self.ignored: list[str] = []

    def next_deadline(self) -> float | None:
        """When ``tick`` has something to do: None unless waiting for an answer."""
        return self._deadline

    def start(self, now: float) -> bytes:
        """First transmission: returns the datagram to send."""
        if self.state is not ExchangeState.IDLE:
            raise RuntimeError("exchange already started")
        self.state = ExchangeState.WAITING
        return self._transmit(now)

    def _transmit(self, now: float) -> bytes:
        self._deadline = now + self.schedule.interval(self.tries, self._rand())
        self.tries += 1
        return self.request

    def tick(self, now: float) -> bytes | None:
        """At or after ``next_deadline()``: a retransmission, or None once the tries ran out."""
        if self.state is not ExchangeState.WAITING or self._deadline is None:
            return None
        if now < self._deadline:
            return None
        if self.tries >= self.schedule.max_tries:
            self.state = ExchangeState.EXHAUSTED
            self._deadline = None
            return None
        return self._transmit(now)

    def receive(self, data: bytes, source: tuple[str, int]) -> T | None:
        """Feed a received datagram; returns the answer once one is accepted."""
        if self.state is not ExchangeState.WAITING:
            return None
        if (source[0], source[1]) != self.server:
            self.ignored.append(f"datagram from {source[0]}:{source[1]}, not the gateway")
            return None
        try:
            answer = self._parse(data)
        except MalformedMessage as exc:
            self.ignored.append(str(exc))
            return None
        if answer is None:
            self.ignored.append("answer to another request")
            return None
        self.state = ExchangeState.DONE
        self._deadline = None
        self.answer = answer
        return answer
