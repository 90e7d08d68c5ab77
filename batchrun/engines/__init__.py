"""Engines: `Run` (what every engine shares: the checkpoint opened for resume, budget, progress, output) with the local
engine, and the Ray engine with its job-wide coordinator.

May import: everything above it: `base` to `results`.
"""
