"""Foundations: errors a person can act on and how they name a setting (a flag or a keyword argument),
key masking, the stop rules, the event loop, object-storage URLs.

May import: nothing else of batchrun.
"""
