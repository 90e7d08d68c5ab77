"""Engines: `Run` (what every engine shares: the checkpoint opened for resume, budget, progress, output) with the local
engine; the engine contract (what an engine is given and reports back); the job-wide coordinator of a run sent from
many processes, and its worker stand-ins, without Ray; the Ray engine, with the coordinator as its actor.

May import: everything above it: `base` to `results`.
"""
