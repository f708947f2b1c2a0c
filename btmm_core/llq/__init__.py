"""Long-lived queries (RFC 8764): the registry pushes changes of RRsets to interested hosts.

The EDNS0 option is ``btmm_core.dns.llq_option`` (server and client both use it); ``server``
is the sans-I/O server state (a registry plug-in, plugged into ``btmm serve`` by
``btmm_core.serve.compose``), ``client`` the sans-I/O client state machine and ``driver`` its
asyncio driver; ``cli`` has ``btmm watch``.
"""
