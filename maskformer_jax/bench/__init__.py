"""Benchmarks, one module each (`python -m maskformer_jax.bench.<name>`); results go to docs/benchmarks.md."""
