"""Authenticated key exchange (Noise IKpsk2 in the spirit of WireGuard) and SA lifecycle."""
