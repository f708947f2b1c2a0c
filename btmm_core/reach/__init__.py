"""Reaching a peer on the best path that answers (issue 13).

``candidates`` gathers a host's endpoint candidates (the places its engine's UDP port can be
reached at) in order of preference, sans-I/O; ``daemon/records.py`` publishes them in the
zone and reads a peer's back. ``probe`` is the authenticated connectivity check (the messages
and their keys) and ``paths`` the per-peer path manager that punches holes, picks the best
path that answered and watches it. The daemon does not run ``probe``/``paths`` yet: until it
does, nothing connects to a candidate other than the seed's ``_autotunnel._udp`` endpoint.
"""
