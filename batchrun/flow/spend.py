"""Money: the cost of a row, the estimate `validate` prints, and the budget (`run.max_cost`).

* Cost = uncached prompt tokens × input price + cached_tokens × cached input price
  (`pricing.cached_input_per_million`, else the input price) + completion_tokens ×
  output price (+ images × `pricing.per_image`); a row answered by sharing another row's identical request
  cost nothing. `cost` and `cost_expr` are the one definition of it.
* The estimate renders a sample of rows and counts about four characters a token
  (as `limits` does), scaled to the whole input; the output side is bounded by the
  cap in params and, with a schema, guessed from the size of a typical answer.
* The budget reserves each request's worst case (estimated input + the full output
  cap) before it is sent and settles it with the real usage, so spent + in flight
  never passes `run.max_cost`. An answer without usable usage stays at its worst case.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import jinja2
import polars as pl

from batchrun.flow.limits import DEFAULT_OUTPUT_ESTIMATE, output_cap, prompt_tokens_estimate
from batchrun.job.inputs import InputTable
from batchrun.job.render import Renderer, RowInputError
from batchrun.job.spec import Job, PricingSpec
from batchrun.job.structured import MAX_REASON_CHARS, answer_schema, repair_request
from batchrun.protocols import protocol_for

SAMPLE_ROWS = 200


def cost(
    pricing: PricingSpec,
    prompt_tokens: int | None,
    completion_tokens: int | None,
    images: int = 0,
    cached_tokens: int | None = None,
) -> float:
    prompt = prompt_tokens or 0
    cached = min(cached_tokens or 0, prompt)  # part of prompt_tokens, never more (a relay's odd count)
    return (
        (prompt - cached) * pricing.input_per_million / 1e6
        + cached * pricing.cached_price / 1e6
        + (completion_tokens or 0) * pricing.output_per_million / 1e6
        + images * (pricing.per_image or 0.0)
    )


def cost_expr(pricing: PricingSpec, columns: list[str]) -> pl.Expr:
    """The output's `cost` column, from the columns the output has."""
    cached = pl.lit(0)
    if "cached_tokens" in columns:
        cached = pl.min_horizontal(pl.col("cached_tokens").fill_null(0), pl.col("prompt_tokens"))
    paid = (
        (pl.col("prompt_tokens") - cached) * (pricing.input_per_million / 1e6)
        + cached * (pricing.cached_price / 1e6)
        + pl.col("completion_tokens") * (pricing.output_per_million / 1e6)
    )
    if pricing.per_image and "image_paths" in columns:
        paid = paid + pl.col("image_paths").list.len().fill_null(0) * pricing.per_image
    if "shared_from" in columns:
        paid = pl.when(pl.col("shared_from").is_not_null()).then(0.0).otherwise(paid)
    return paid.alias("cost")


def money(amount: float, pricing: PricingSpec) -> str:
    return f"{amount:.4f} {pricing.currency}"


# --- the budget --------------------------------------------------------------------


class Budget:
    """`run.max_cost`: a request goes only if spent + in-flight worst cases + its own stay within it."""

    def __init__(self, limit: float | None, pricing: PricingSpec | None, spent: float) -> None:
        self.limit = limit if pricing is not None else None
        self.pricing = pricing
        self.spent = spent
        self.reserved = 0.0
        self.refused: float | None = None  # the worst case of the request that was not sent
        # Answers whose usage was missing or refused (reply.token_count): each counted at its worst case.
        self.unmetered = 0
        # Real prompt tokens / estimated, the highest seen: corrects the chars/4 guess
        # for text that tokenizes densely (e.g. Chinese) once answers come back.
        self._input_scale = 1.0

    @property
    def stopped(self) -> bool:
        return self.refused is not None

    async def reserve(self, prompt_estimate: int, cap: int | None) -> float | None:
        """The amount held for one request, or None if it could pass the budget (and then no more are sent).

        Async for the row path's seam (seams.Spending): a Ray worker's stand-in asks the coordinator."""
        if self.limit is None or self.pricing is None:
            return 0.0
        if self.stopped:
            return None
        worst = cost(
            self.pricing,
            math.ceil(prompt_estimate * self._input_scale),
            cap if cap is not None else DEFAULT_OUTPUT_ESTIMATE,
        )
        if self.spent + self.reserved + worst > self.limit:
            self.refused = worst
            return None
        self.reserved += worst
        return worst

    def settle(
        self,
        held: float,
        prompt_estimate: int,
        prompt_tokens: int | None,
        completion_tokens: int | None,
        images: int = 0,
        cached_tokens: int | None = None,
    ) -> None:
        """`held` released and the answer's cost spent. A failed request costs nothing (0 tokens each); an answer
        without usable counts (None) costs what was held for it, its worst case: the relay may well charge it."""
        if self.limit is None or self.pricing is None:
            return
        self.reserved -= held
        paid = cost(self.pricing, prompt_tokens, completion_tokens, images, cached_tokens)
        if prompt_tokens is None or completion_tokens is None:
            self.unmetered += 1
            paid = max(paid, held)
        self.spent += paid
        if prompt_tokens and prompt_estimate:
            self._input_scale = max(self._input_scale, prompt_tokens / prompt_estimate)

    def stop_message(self, job: Job, pending: int, max_cost: str = "--max-cost") -> str:
        """`max_cost`: how the person sets it for a run (`--max-cost`, or `max_cost=` in Python)."""
        assert self.pricing is not None and self.limit is not None and self.refused is not None
        return (
            f"run stopped: budget reached: spent {money(self.spent, self.pricing)} of max_cost "
            f"{money(self.limit, self.pricing)}, and the next request could cost up to "
            f"{money(self.refused, self.pricing)}. {pending} rows are pending; finished rows are kept. "
            f"Raise run.max_cost (or pass a higher {max_cost}) and run again to go on"
        )


# --- the estimate ------------------------------------------------------------------


@dataclass(frozen=True)
class Estimate:
    rows: int
    sampled: int
    input_tokens: int  # the whole job, first asks only
    image_tokens: int  # one input image, as the protocol's models count a small one (0: no images)
    output_cap: int | None  # a row
    typical_output: int | None  # a row, from the schema
    repairs: int  # output.repair_attempts

    @property
    def max_output(self) -> int | None:
        return None if self.output_cap is None else self.rows * self.output_cap * (1 + self.repairs)

    @property
    def max_input(self) -> int | None:
        """Every ask at its worst: each repair resends the prompt plus a capped answer and the reason."""
        if self.output_cap is None:
            return None
        repair_extra = self.output_cap + prompt_tokens_estimate(len(repair_request("x" * MAX_REASON_CHARS)))
        return self.input_tokens * (1 + self.repairs) + self.rows * self.repairs * repair_extra


def estimate_job(job: Job, table: InputTable, renderer: Renderer) -> Estimate:
    """Input tokens from the rendered prompts of rows spread over the input, scaled to all rows."""
    spec = job.spec
    rows = table.count()
    sample = table.sample(SAMPLE_ROWS, rows)
    per_image = protocol_for(spec.provider.api).INPUT_IMAGE_TOKENS  # rows without images count none
    tokens: list[int] = []
    images = 0
    caps: list[int | None] = []  # an OpenAI Batch line's cap is its body's, unless params set one
    for row in sample.iter_rows(named=True):
        try:
            request = renderer.render(row)
        except (jinja2.TemplateError, RowInputError):
            continue  # such rows fail without a request
        tokens.append(prompt_tokens_estimate(request.text_chars) + per_image * len(request.images))
        images += len(request.images)
        caps.append(output_cap({**(request.body or {}), **spec.params}))
    per_row = sum(tokens) / len(tokens) if tokens else 0.0
    cap = output_cap(spec.params)
    if job.batch_input and caps:
        cap = None if None in caps else max(c for c in caps if c is not None)
    schema = answer_schema(spec, protocol_for(spec.provider.api))
    typical = None
    if spec.output.parse != "text" and schema is not None:
        typical = prompt_tokens_estimate(len(json.dumps(typical_value(schema, schema), separators=(",", ":"))))
        typical = min(typical, cap) if cap is not None else typical
    repairs = spec.output.repair_attempts
    return Estimate(rows, len(tokens), round(per_row * rows), per_image if images else 0, cap, typical, repairs)


def describe_estimate(est: Estimate, job: Job) -> list[str]:
    pricing = job.spec.pricing
    lines = [
        f"estimate for {est.rows} rows (prompts of {est.sampled} sampled rows, about 4 characters a token):",
        f"  input tokens:  ~{est.input_tokens:,} ({est.input_tokens / max(est.rows, 1):.0f} a row)",
    ]
    if est.image_tokens:
        lines[-1] += f", images counted at {est.image_tokens} tokens each (a small image; larger ones count more)"
    if est.output_cap is None:
        lines.append(
            "  output tokens: no cap in params (max_completion_tokens / max_tokens / maxOutputTokens), "
            "so no upper bound; set one to bound the cost"
        )
    else:
        where = "the largest cap in the sampled bodies and params" if job.batch_input else "the cap in params"
        lines.append(f"  output tokens: at most {est.max_output:,} ({est.output_cap} a row, {where})")
    if est.typical_output is not None:
        lines[-1] += f"; typically ~{est.typical_output * est.rows:,} ({est.typical_output} a row, from the schema)"
    if est.repairs:
        lines.append(f"  the maximum counts {est.repairs} repair asks for every row (output.repair_attempts)")
    if pricing is None:
        lines.append("  cost: set pricing in the job file to see it")
        return lines
    low = cost(pricing, est.input_tokens, 0)
    high = None if est.max_input is None else cost(pricing, est.max_input, est.max_output)
    line = f"  cost: from {money(low, pricing)} (input only) to "
    line += "no upper bound" if high is None else f"{money(high, pricing)} (every answer at the cap)"
    if est.typical_output is not None:
        likely = cost(pricing, est.input_tokens, est.typical_output * est.rows)
        line += f"; likely ~{money(likely, pricing)}"
    lines.append(line)
    limit = job.spec.run.max_cost
    if limit is not None:
        lines.append(f"  budget: run.max_cost {money(limit, pricing)} (the run stops before it would pass it)")
        if est.output_cap is None:
            lines.append(
                f"  warning: with no output cap, the budget assumes {DEFAULT_OUTPUT_ESTIMATE} output tokens a request; "
                "set a cap in params to make it a bound"
            )
    return lines


def describe_cached(est: Estimate, cached_share: float, pricing: PricingSpec) -> str:
    """The input's cost with the share of it the provider's cache is expected to serve (`validate`)."""
    plain = cost(pricing, est.input_tokens, 0)
    cached = cost(pricing, est.input_tokens, 0, cached_tokens=round(est.input_tokens * cached_share))
    line = f"  input cost with the expected cache hits: ~{money(cached, pricing)} instead of {money(plain, pricing)}"
    if pricing.cached_input_per_million is None:
        line += "; set pricing.cached_input_per_million to count cached input at the provider's lower price"
    return line


TYPICAL_STRING_CHARS = 16
TYPICAL_ARRAY_ITEMS = 2


def typical_value(schema: Any, root: dict[str, Any], depth: int = 0) -> Any:
    """A value of the size an answer to `schema` usually has, to count its characters."""
    if not isinstance(schema, dict) or depth > 8:
        return "x" * TYPICAL_STRING_CHARS
    ref = schema.get("$ref")
    if isinstance(ref, str) and ref.startswith("#/"):
        target: Any = root
        for part in ref[2:].split("/"):
            target = target.get(part) if isinstance(target, dict) else None
        return typical_value(target, root, depth + 1)
    for key in ("anyOf", "oneOf", "allOf"):
        branches = [b for b in schema.get(key) or [] if not (isinstance(b, dict) and b.get("type") == "null")]
        if branches:
            return typical_value(branches[0], root, depth + 1)
    if isinstance(schema.get("enum"), list) and schema["enum"]:
        options = schema["enum"]
        if all(isinstance(o, str) for o in options):
            return "x" * round(sum(map(len, options)) / len(options))
        return options[0]
    if "const" in schema:
        return schema["const"]
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), None)
    if kind is None:
        kind = "object" if "properties" in schema else "array" if "items" in schema else "string"
    if kind == "object":
        props = schema.get("properties") or {}
        return {name: typical_value(sub, root, depth + 1) for name, sub in props.items()}
    if kind == "array":
        n = max(int(schema.get("minItems", 0)), TYPICAL_ARRAY_ITEMS)
        return [typical_value(schema.get("items"), root, depth + 1)] * n
    if kind == "string":
        low, high = int(schema.get("minLength", 0)), int(schema.get("maxLength", TYPICAL_STRING_CHARS))
        return "x" * max(low, min(high, TYPICAL_STRING_CHARS))
    return {"integer": 100, "number": 12.5, "boolean": True}.get(kind)
