"""`batchrun bench`: throughput stage by stage, push-back scenarios, the Ray engine against the local one.

May import: everything above it: `base` to `app`.
"""
