"""Network-namespace labs: the tests', the benchmarks' and ``btmm lab``'s private networks."""
