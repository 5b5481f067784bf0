"""Benchmarks for terra_bc.

``python -m benchmarks`` runs the ten example programs of ``examples/`` eagerly,
under ``jax.jit`` and under ``python -m terra_bc`` (see ``benchmarks/run.py``).
"""
