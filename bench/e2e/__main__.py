"""``python3 -m bench.e2e``: see ``bench/e2e/__init__.py``."""

from bench.e2e.cli import script

script()
