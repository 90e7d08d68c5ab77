"""Errors a person can act on: each is one line, printed without a traceback."""


class JobError(Exception):
    """Bad job file, bad input or bad setup, found before any request is sent."""


class RunAborted(Exception):
    """The run was stopped because continuing would not help (bad key, no balance)."""


class RunInterrupted(Exception):
    """Ctrl-C stopped the run; what finished is committed and the same command resumes."""

    def __init__(self, done: int, total: int, cancelled: int, cancelled_when: str) -> None:
        message = f"interrupted: {done} of {total} rows done, {total - done} pending"
        if cancelled:
            message += (
                f"; {cancelled} requests in flight were cancelled {cancelled_when} "
                "(they may have been paid; the next run counts them)"
            )
        super().__init__(message)
        self.done = done
        self.total = total
        self.cancelled = cancelled  # requests cut off before their answer: they may have been paid
        self.cancelled_when = cancelled_when


class BudgetReached(Exception):
    """The run stopped sending because the next request could pass run.max_cost; it resumes when raised."""
