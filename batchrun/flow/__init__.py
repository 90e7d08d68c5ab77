"""Flow control and money: admission (in flight, requests and tokens per window, the adaptive pace), the outage
breaker, the cost estimate and budget, identical requests sent once.

May import: `base`, `job`, `ledger`, `protocols`.
"""
