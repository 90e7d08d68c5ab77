"""Structured output in the row path: asking again when an answer fails its schema, and explaining a refused schema.

`output.repair_attempts` sends a failed answer back with a message quoting what
is wrong with it (structured.repair_request), up to N times; the row keeps the
last answer with the tokens, attempts and time of every ask.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import replace

from batchrun.job.settings import RequestSettings
from batchrun.job.structured import SCHEMA_INVALID, AnswerParser, repair_request
from batchrun.pipeline.transport import Outcome
from batchrun.protocols import CallError


def explain_native_rejection(error: CallError, settings: RequestSettings) -> None:
    """A 400 about the schema batchrun added: say so, and name the switch that turns it off."""
    text = f"{error.message} {error.code}".lower()
    mentions = ("response_format", "schema", "responsemimetype", "structured")
    if error.status == 400 and settings.native_schema is not None and any(m in text for m in mentions):
        error.message += (
            "; batchrun sent output.schema as native structured output: if this model does not support it, "
            "set output.native_schema: false (the answer is still checked against the schema)"
        )


async def ask_with_repairs(
    first: Outcome,
    parser: AnswerParser,
    max_repairs: int,
    follow_up: Callable[[str, str], Awaitable[Outcome | None]],
) -> tuple[Outcome, int]:
    """Ask again, up to `max_repairs` times, while the answer fails its check.

    `follow_up(answer, message)` sends the answer back with a message quoting what is
    wrong with it (returns None if the budget refused it).
    The returned outcome is the last answer, with the tokens, attempts and time of every ask.
    """
    outcome, repairs = first, 0
    while outcome.reply is not None and repairs < max_repairs:
        reply = outcome.reply
        verdict = parser.judge(reply.text, reply.finish_reason, reply.tool_calls)
        if verdict.error_class != SCHEMA_INVALID:  # ok, or cut off: asking again would not help
            break
        nxt = await follow_up(reply.text or "", repair_request(verdict.error or ""))
        if nxt is None:
            break
        repairs += 1
        outcome = _combined(outcome, nxt)
    return outcome, repairs


def _combined(before: Outcome, after: Outcome) -> Outcome:
    """The later ask's answer (or, if it failed, the earlier one), carrying the cost of both."""
    reply = after.reply or before.reply
    assert before.reply is not None and reply is not None
    total = replace(
        reply,
        prompt_tokens=_add(before.reply.prompt_tokens, after.reply.prompt_tokens if after.reply else None),
        completion_tokens=_add(before.reply.completion_tokens, after.reply.completion_tokens if after.reply else None),
    )
    return replace(
        after,
        reply=total,
        error=None,
        attempts=before.attempts + after.attempts,
        latency_s=before.latency_s + after.latency_s,
    )


def _add(a: int | None, b: int | None) -> int | None:
    return None if a is None and b is None else (a or 0) + (b or 0)
