"""Speed benchmarks for Sieve, with peer libraries side by side: ``python -m benchmarks.speed``."""
