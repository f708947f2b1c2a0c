"""Long-lived queries (RFC 8764): the registry pushes changes of RRsets to interested hosts.

``option`` is the EDNS0 option, ``server`` the sans-I/O server state (a registry plug-in,
plugged into ``btmm serve`` by ``btmm_core.serve.compose``), ``client`` the sans-I/O client
state machine and ``driver`` its asyncio driver; ``cli`` has ``btmm watch``.
"""
