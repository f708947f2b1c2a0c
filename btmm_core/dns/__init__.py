"""The DNS layer that servers and clients share: wire helpers, TSIG, EDNS options, key files.

Below every protocol that speaks DNS (the registry, LLQ, the host daemon): nothing here imports
them. ``wire`` walks names and RRs of raw messages (RFC 1035 section 4.1), ``tsig`` signs and
verifies (RFC 8945), ``edns`` and ``llq_option`` are EDNS options (RFC 6891; the update lease,
draft-ietf-dnssd-update-lease / RFC 9664; LLQ, RFC 8764), ``enrol`` the device enrolment
exchange, ``keyfile`` BIND key files, ``names`` the device-name rule, ``fastpath`` the
recogniser of plain queries.
"""
