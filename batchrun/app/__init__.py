"""What `run`, `validate`, `status` and `models` do, for the command line and the Python API alike.

May import: everything above it: `base` to `engines`.
"""
