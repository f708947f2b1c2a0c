"""STUN (RFC 8489): the wire protocol both the registry (answering Binding requests) and hosts
(learning their server-reflexive address, telling how their NAT maps) speak.

Rank 1, beside ``dns/``: ``message`` is the codec and ``looks_like_stun``; ``responder`` the
server core; ``client`` one Binding transaction with its retransmissions, and the NAT mapping
verdict; ``server`` and ``driver`` run them over asyncio UDP (``btmm serve``, ``btmm
netcheck``).
"""
