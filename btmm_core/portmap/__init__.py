"""Inbound UDP port mapping on the home gateway: PCP (RFC 6887), NAT-PMP (RFC 6886), UPnP IGD.

The protocol modules (``natpmp``, ``pcp``, ``retry``, ``epoch``, ``addresses``) are sans-I/O;
``client`` and ``renewal`` are the thin asyncio drivers; ``cli`` holds ``btmm netcheck``.
"""
