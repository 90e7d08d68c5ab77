"""Foundations: errors a person can act on, key masking, the stop rules, the event loop, object-storage URLs.

May import: nothing else of batchrun.
"""
