"""``btmm serve``: the composition root of the registry server (config, compose, cli)."""
