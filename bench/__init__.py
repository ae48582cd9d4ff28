"""Benchmarks: each module has a ``main()`` that sets up what it needs, runs bounded and prints
a table. ``python -m bench`` (``make bench``) runs them all."""
