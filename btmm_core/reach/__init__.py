"""Reaching a peer on the best path that answers (issue 13).

``candidates`` gathers a host's endpoint candidates (the places its engine's UDP port can be
reached at) in order of preference, sans-I/O; ``daemon/records.py`` publishes them in the
zone and reads a peer's back. Connectivity checks, hole punching and path selection build on
them (``probe``, ``paths``: a later part of issue 13); until those land, nothing connects to a
candidate other than the seed's ``_autotunnel._udp`` endpoint.
"""
