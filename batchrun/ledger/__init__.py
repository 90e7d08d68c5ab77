"""The ledger: the SQLite checkpoint, each row's intent committed before its send and its result after.

May import: `base`, `job`.
"""
