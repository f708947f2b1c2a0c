"""``python3 -m btmm_core`` is the ``btmm`` command."""

from btmm_core.cli import main

main()
