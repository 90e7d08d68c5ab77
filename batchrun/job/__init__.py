"""The job: the job file read and checked, the input table in batches, rows rendered to provider-neutral requests,
answers parsed against the output schema, and the frozen `RequestSettings` every body is built from.
No I/O to the relay.

May import: `base`.
"""
