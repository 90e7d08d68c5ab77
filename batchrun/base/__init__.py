"""Foundations: errors a person can act on, how they name a setting (flag or keyword argument), key masking, the stop rules, the event loop, object-storage URLs.

May import: nothing else of batchrun.
"""
