"""The host daemon (``btmm join``, ``btmm up``, ``btmm status``): publishes this host's records
in the user's zone, watches the zone for the user's other hosts and keeps a tunnel to each."""
