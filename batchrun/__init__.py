"""batchrun: a table in, one model call per row, a table out."""

__version__ = "0.1.0"
