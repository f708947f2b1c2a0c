"""Test tool, run inside a lab namespace: a stranger who knows the victim's public key (so its
packets pass mac1) sends forged handshake initiations from SRC_HOST:SRC_PORT, COUNT of them
spaced by GAP seconds (a bounded loop), and reports how many cookie replies came back.

    kx_attacker.py SRC_HOST SRC_PORT DST_HOST DST_PORT VICTIM_PUB_B64 COUNT GAP
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time

from btmm_core.dataplane.api import CONTROL_MARKER
from btmm_core.keyex.keys import StaticKey, decode_public
from btmm_core.keyex.noise import Handshaker, MessageType


def main() -> None:
    src_host, src_port, dst_host, dst_port, pub, count, gap = sys.argv[1:8]
    victim = decode_public(pub)
    stranger = Handshaker(StaticKey.generate(), os.urandom(32), os.urandom)
    stranger.add_peer(victim)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((src_host, int(src_port)))
    sock.setblocking(False)
    cookies = 0
    for i in range(min(int(count), 1000)):
        msg = stranger.initiate(victim, 0x10000 + i, time.monotonic(), time.time())
        sock.sendto(CONTROL_MARKER + msg, (dst_host, int(dst_port)))
        end = time.monotonic() + float(gap)
        while time.monotonic() < end:
            try:
                data = sock.recv(2048)
            except BlockingIOError:
                time.sleep(0.005)
                continue
            if data[4:5] == bytes([MessageType.COOKIE_REPLY]):
                cookies += 1
    print(json.dumps({"sent": min(int(count), 1000), "cookie_replies": cookies}))


if __name__ == "__main__":
    main()
