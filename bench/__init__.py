"""Benchmarks: each `bench/bench_*.py` compares postcopy with a named peer in the same run and
prints ratios.  `make bench` (python -m bench) runs them all; `python -m bench NAME` runs one."""
