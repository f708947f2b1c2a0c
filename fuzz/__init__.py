"""Coverage-guided fuzzing of btmm's parsers of network input (atheris/libFuzzer).

A developer tool like ``bench/``: nothing in ``btmm_core`` imports it. ``python3 -m fuzz
--list`` names the targets; ``python3 -m fuzz TARGET --seconds 60`` runs one from its seed
corpus (``fuzz/corpus/TARGET``, written by ``python3 -m fuzz.seeds``).
"""
