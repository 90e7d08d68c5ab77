"""What a run leaves: the Parquet output and summary from the checkpoint, the report's figures and its HTML page.

May import: `base`, `job`, `ledger`, `protocols`, `flow`, `pipeline`.
"""
