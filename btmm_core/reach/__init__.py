"""Reaching a peer: endpoint candidates, authenticated connectivity checks, path selection."""
