"""Authenticated key exchange (Noise IKpsk2 in the spirit of WireGuard) and SA lifecycle.

Modules: ``keys`` (device key pair, account PSK, the inner address bound to a key), ``noise``
(the sans-I/O handshake; its docstring specifies the construction), ``session`` (sans-I/O
per-peer lifecycle: rekey, make-before-break, expiry, retries, keepalives), ``driver``
(asyncio, bound to a data-plane engine), ``cli`` (a JSON-configured runner for tests and
development).

The handshake in one paragraph
------------------------------
Each host has an X25519 device key; its peers know its public key in advance. The initiator
sends one message: a fresh ephemeral key, its own static key encrypted under keys from
DH(ephemeral, responder static), and a payload (a TAI64N timestamp and the SPI it wants to
receive on) encrypted under keys that also mix DH(initiator static, responder static). The
responder answers with its own ephemeral key, mixing DH(ephemeral, ephemeral),
DH(initiator static, responder ephemeral) and the account PSK, and a payload carrying its
receive SPI. Both ends then hold the same chaining key, from which two AES-256-GCM keying
materials (one per direction) are expanded with HKDF under distinct labels and bound to the
transcript hash. A confirm from the initiator (acknowledged by the responder) proves that it
derived the same keys, and only then does the responder transmit on them. Every initiation
and response carries mac1 (keyed by the receiver's public key); under load an initiation
also needs mac2, a MAC keyed by a cookie that the responder hands out only to the source
address that asked.

What an attacker on the path can and cannot do
----------------------------------------------
It cannot: read or forge tunnel traffic or handshake payloads; learn which device initiated
(the initiator's static key travels encrypted; the responder's is known to the initiator by
design); impersonate a host without both its device private key and the account secret (a
stolen device key alone fails at message 2, a leaked account secret alone fails at the static-
static DH); replay an initiation to the same responder (timestamps must increase, and must lie
within ``max_skew`` behind and ``max_future`` ahead of its clock, which bounds replays after a
restart); claim another device's inner address (it is derived from the device key, see
``keys.ula_of``); move a peer's endpoint with an initiation (only messages that prove the
PSK do); lock a peer out with a far-future timestamp (see ``noise``); make an initiator do
Diffie-Hellman work with forged responses beyond a per-source rate; decrypt recorded
tunnel traffic after a later compromise of device keys and account secret (the SA keys depend
on ephemeral DHs; forward secrecy); impersonate other hosts to a host whose own device key it
stole, unless it also has the account secret (the PSK blocks the key-compromise impersonation
that plain IK allows); make a responder do Diffie-Hellman work without knowing its public key
(mac1), nor, under load, without receiving at the address it claims (mac2/cookie); exhaust a
responder's CPU from one address (per-source token bucket).

It can: drop, delay or reorder packets, and so deny service (the handshake retries every 5 s
for 90 s, then reports failure); see that two addresses run btmm, when they handshake (message
types and sizes are fixed), the SPIs, packet sizes and timing; replay a captured initiation to
a responder that restarted within ``max_skew`` of it (the responder answers and holds one
pending receive SA, but the replayer cannot use it without the keys, and nothing is transmitted
on it without a valid confirm, though it may displace a handshake in progress); after stealing
a responder's device key, decrypt recorded first messages to it (the initiator's identity,
timestamp and SPI: message 1 of IK is not forward secret); with a host's public key, send
packets that pass mac1 and make that host spend one or two DHs each, up to the rate limits; an
attacker that holds some device's key pair but not the account secret can still get a responder
to answer (the PSK enters in message 2) and so cost it a pending SA slot until a newer
initiation or the key lifetime replaces it, and displace a handshake of the real device that is
in flight (which is retried); it can neither move that device's endpoint nor lock it out.
Metadata such as the public keys in the registry's TXT records is visible to anyone who can
query that zone.
"""
