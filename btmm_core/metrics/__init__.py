"""Prometheus metrics of ``btmm up`` and ``btmm serve`` (``--metrics ADDR``): the endpoint."""
