"""TSIG replay protection shared by the worker processes of one registry (``--workers`` on
SQLite), as strict as one process's ``ReplayGuard``.

RFC 8945 5.2.3 and section 10 (replay): a server refuses a MAC it has seen and, by this
project's rule, a Time Signed older than the newest it accepted for the key. With N workers on
one port the kernel gives each client's datagrams to one worker, but a recorded message
resent from another address lands on another; the seen MACs and newest times must therefore
be one state for all workers, for queries too (a query changes no data, but a replayed signed
query would still bind a DNS Push session or read fresh data).

The state lives in shared memory (a memfd mapped by every worker, made before they fork) and
each ``admit_raw`` is one step under a process-shared semaphore (a futex: taking it free costs
no system call, where a ``lockf`` pair cost two inside the step and made two workers wait on
each other at every query). The holder's pid is kept beside the table; a worker that waits
half a second looks at it, and if the holder is dead (killed inside the step) it lets the
semaphore go on its behalf, one such recovery at a time (under ``lockf``), so a killed worker
never leaves the others locked out. (A holder killed in the few instructions between taking
the semaphore and writing its pid leaves no pid: after two seconds of that, it is let go too.)

Why this is the same rule as ``ReplayGuard`` and not a weaker one:

- ``ReplayGuard`` refuses (key, Time Signed, MAC) when the MAC was seen for the key or the
  time is older than the key's newest. Here the newest time per key is kept exactly (a table
  of keys by a 128-bit hash of the key name's canonical wire form).
- The seen MACs are kept as 128-bit hashes of (key, MAC) in buckets of 8, each with its Time
  Signed and its key. A MAC covers the Time Signed (RFC 8945 4.3.3), so a message with a seen
  MAC has that MAC's time, unless HMAC collides. An entry whose time is older than its key's
  newest therefore guards nothing the time rule does not already refuse: only such entries
  (or empty ones) are reused. A MAC seen at the key's newest second stays until that key
  moves on.
- Should a bucket hold 8 entries that all still guard something (8 messages hashed to one of
  16,384 buckets within one second of their keys), the new message is refused (BADTIME)
  rather than any entry dropped: the guard fails closed, and ``full`` counts it. Likewise
  for the table of keys (``KEY_SLOTS`` keys).

So a message is refused here exactly when ``ReplayGuard`` would refuse it, but for a 2^-128
hash collision (refused too, never admitted) and the fail-closed cases above.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import mmap
import multiprocessing
import multiprocessing.synchronize
import os
import struct
from pathlib import Path

from btmm_core.dns.tsig import ReplayGuard

#: Keys the shared table holds (accounts, devices, invites of one registry).
KEY_SLOTS = 1 << 16
#: Buckets of seen MACs, 8 entries each.
BUCKETS = 1 << 14
_PER_BUCKET = 8
_KEY = struct.Struct("<16sQ")
_ENTRY = struct.Struct("<QI4x16s")
_BUCKET = struct.Struct("<" + "QI4x16s" * _PER_BUCKET)
_TIME = struct.Struct("<Q")
_HOLDER = struct.Struct("<q")
#: the holder's pid first, then the keys, then the buckets of MACs
_KEYS = 8
_MACS = _KEYS + KEY_SLOTS * _KEY.size
SIZE = _MACS + BUCKETS * _BUCKET.size
#: seconds a worker waits for the semaphore before it looks at its holder
_PATIENCE = 0.5
#: tries without blocking before a worker sleeps on the semaphore
_SPINS = 64
_EMPTY = bytes(16)


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, dead but not yet reaped by its parent, does not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def _digest(data: bytes) -> bytes:
    d = hashlib.blake2b(data, digest_size=16).digest()
    # an all-zero hash would read as an empty slot: vanishingly unlikely, but keep it apart
    return d if d != _EMPTY else b"\x01" + d[1:]


class SharedReplayGuard(ReplayGuard):
    """A ``ReplayGuard`` whose state every worker forked after ``create`` shares."""

    def __init__(
        self, fudge: int, fd: int, memory: mmap.mmap, lock: multiprocessing.synchronize.Lock
    ) -> None:
        super().__init__(fudge, {}, {})
        self._fd = fd
        self._mem = memory
        self._lock = lock
        #: times this worker let the semaphore go for a dead holder
        self.recovered = 0
        #: key name (canonical wire) -> its slot in the key table; slots never move
        self._slots: dict[bytes, int] = {}
        #: messages refused because a bucket or the key table was full of live entries
        self.full = 0

    @classmethod
    def create(cls, fudge: int) -> SharedReplayGuard:
        """A fresh shared state: make it before forking the workers."""
        fd = os.memfd_create("btmm-registry-replay", os.MFD_CLOEXEC)
        os.ftruncate(fd, SIZE)
        return cls(fudge, fd, mmap.mmap(fd, SIZE), multiprocessing.Lock())

    def close(self) -> None:
        self._mem.close()
        os.close(self._fd)

    # -- ReplayGuard ------------------------------------------------------------------------

    def check_raw(self, key: bytes, time_signed: int, mac: bytes) -> bool:
        return self._locked(key, time_signed, mac, store=False)

    def remember_raw(self, key: bytes, time_signed: int, mac: bytes) -> None:
        self._locked(key, time_signed, mac, store=True)

    def admit_raw(self, key: bytes, time_signed: int, mac: bytes) -> bool:
        return self._locked(key, time_signed, mac, store=True)

    def _locked(self, key: bytes, time_signed: int, mac: bytes, *, store: bool) -> bool:
        # the hashing before the lock: other workers wait only for the table's own work
        digest = _digest(key + mac)
        lock = self._lock
        if not lock.acquire(False):
            # the holder runs on another core for a few µs: a short spin usually gets the
            # semaphore without the sleep and wake-up a blocking wait costs both workers
            for _ in range(_SPINS):
                if lock.acquire(False):
                    break
            else:
                orphaned = 0
                while not lock.acquire(timeout=_PATIENCE):
                    orphaned = self._recover(orphaned)
        _HOLDER.pack_into(self._mem, 0, os.getpid())
        try:
            return self._decide(key, time_signed, digest, store=store)
        finally:
            _HOLDER.pack_into(self._mem, 0, 0)
            lock.release()

    def _recover(self, orphaned: int) -> int:
        """After waiting ``_PATIENCE``: let the semaphore go if its holder is dead. Returns how
        many times in a row it was held with no pid written."""
        fcntl.lockf(self._fd, fcntl.LOCK_EX)  # one recovery at a time
        try:
            (holder,) = _HOLDER.unpack_from(self._mem, 0)
            if holder == 0:
                orphaned += 1
                if orphaned * _PATIENCE < 2.0:
                    return orphaned
            elif _alive(holder):
                return 0
            _HOLDER.pack_into(self._mem, 0, 0)
            with contextlib.suppress(ValueError):  # released meanwhile after all
                self._lock.release()
            self.recovered += 1
            return 0
        finally:
            fcntl.lockf(self._fd, fcntl.LOCK_UN)

    def prune(self, now: int) -> None:
        return None  # entries are reused as their keys move on (see the module's text)

    # -- the table ----------------------------------------------------------------------------

    def _slot(self, key: bytes) -> int | None:
        """The key's slot (claimed now if new; under the lock), None if the table is full."""
        slot = self._slots.get(key)
        if slot is not None:
            return slot
        mem = self._mem
        digest = _digest(key)
        start = int.from_bytes(digest[:4], "little") % KEY_SLOTS
        for i in range(KEY_SLOTS):
            s = (start + i) % KEY_SLOTS
            off = _KEYS + s * _KEY.size
            held = mem[off : off + 16]
            if held in (digest, _EMPTY):
                if held == _EMPTY:
                    mem[off : off + _KEY.size] = _KEY.pack(digest, 0)
                self._slots[key] = s
                return s
        return None

    def _newest(self, slot: int) -> int:
        return int(_TIME.unpack_from(self._mem, _KEYS + slot * _KEY.size + 16)[0])

    def _decide(self, key: bytes, time_signed: int, digest: bytes, *, store: bool) -> bool:
        slot = self._slot(key)
        if slot is None:
            self.full += 1
            return False
        newest = self._newest(slot)
        if time_signed < newest:
            return False
        base = _MACS + (int.from_bytes(digest[:4], "little") % BUCKETS) * _BUCKET.size
        fields = _BUCKET.unpack_from(self._mem, base)
        if digest in fields:
            return False  # seen (a MAC covers its time: one with this MAC is a replay)
        free = -1
        for j in range(_PER_BUCKET):
            t, owner, held = fields[3 * j : 3 * j + 3]
            if held == _EMPTY or t < (newest if owner == slot else self._newest(owner)):
                free = j  # guards nothing the time rule does not refuse already
                break
        if free < 0:
            self.full += 1
            return False
        if store:
            _ENTRY.pack_into(self._mem, base + free * _ENTRY.size, time_signed, slot, digest)
            if time_signed > newest:
                _TIME.pack_into(self._mem, _KEYS + slot * _KEY.size + 16, time_signed)
        return True
