"""Paper reproductions and benchmarks. `python -m experiments.run NAME --out DIR` runs one study of
`experiments/studies/` through the shared harness (`harness.py`); the `bench_*.py` scripts stand alone."""
