"""batchrun's version, where every layer may read it (the summary and the CLI both print it)."""

__version__ = "0.1.0"
