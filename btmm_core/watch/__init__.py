"""``btmm watch``: follow an RRset by long-lived query (``llq``) or DNS Push (``push``)."""
