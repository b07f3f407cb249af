"""Prometheus metrics (what BentoML's own HTTP metrics cannot see)."""
