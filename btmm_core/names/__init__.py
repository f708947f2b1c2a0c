"""Names and services for every program: the per-host stub resolver and wide-area DNS-SD."""
