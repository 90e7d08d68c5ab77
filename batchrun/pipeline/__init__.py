"""The row pipeline: one row rendered, its images read, admitted, sent, parsed, repaired and committed. Every engine
composes `rows.RowPipeline`; `seams` names the collaborators it is handed.

May import: `base`, `job`, `ledger`, `protocols`, `flow`.
"""
