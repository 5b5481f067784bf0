"""Differential fuzzer: random imperative JAX programs run eagerly and under terra_bc, values
and side-effect logs compared (docs/reliability.md).  ``python -m tests.fuzz --help``."""
