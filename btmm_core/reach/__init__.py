"""Reaching a peer on the best path that answers (issue 13).

``candidates`` gathers a host's endpoint candidates (the places its engine's UDP port can be
reached at) in order of preference, sans-I/O; ``daemon/records.py`` publishes them in the
zone and reads a peer's back. ``probe`` is the authenticated connectivity check (the messages
and their keys) and ``paths`` the per-peer path manager that punches holes, picks the best
path that answered and watches it. ``btmm up`` runs one path manager per verified peer
(``daemon/pathset.py``, ``daemon/host.py``) and sends a peer's tunnel where it says.
"""
