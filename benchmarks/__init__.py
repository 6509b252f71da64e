"""Benchmarks and load generators (``make bench`` runs :mod:`benchmarks.run`)."""
