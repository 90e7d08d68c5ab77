"""Errors a person can act on: each is one line, printed without a traceback."""


class JobError(Exception):
    """Bad job file, bad input or bad setup, found before any request is sent."""


class RunAborted(Exception):
    """The run was stopped because continuing would not help (bad key, no balance)."""


class BudgetReached(Exception):
    """The run stopped sending because the next request could pass run.max_cost; it resumes when raised."""
