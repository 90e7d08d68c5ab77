"""Deterministic answers derived from the request, so runs are repeatable.

Sentiment prompts ("positive, negative or neutral") get a real lexicon label,
so the demo's output is right by inspection; a JSON schema gets a value that
satisfies it; a forced tool gets a call whose arguments match its parameters.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

_POSITIVE = set(
    "love loved lovely great excellent perfect amazing awesome good best happy fantastic wonderful recommend "
    "recommended sturdy comfortable fast easy beautiful solid works worth delighted pleased reliable quiet "
    "impressed superb brilliant favourite favorite nice glad bargain flawless".split()
)
_NEGATIVE = set(
    "broke broken bad worst terrible awful poor disappointed disappointing leaks leaked leaking waste refund "
    "returned return cheap flimsy useless slow noisy stopped died faulty defective hate hated horrible rude "
    "cracked missing late never wrong scratched overpriced unusable sticky smell smells rattles".split()
)
_WORD = re.compile(r"[a-zA-Z']+")
_LETTERS = re.compile(r"[^\W\d_]+")  # words in any script, so answers keep non-ASCII text
_LABELS = ("positive", "negative", "neutral")


def digest(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


def count_tokens(text: str) -> int:
    """A stable stand-in for a tokenizer: about four characters a token."""
    return max(1, (len(text) + 3) // 4)


def sentiment(text: str) -> str:
    words = [w.lower() for w in _WORD.findall(text)]
    score = sum(w in _POSITIVE for w in words) - sum(w in _NEGATIVE for w in words)
    # "not good" and friends flip the sign of the word after them.
    score -= 2 * sum(1 for a, b in zip(words, words[1:]) if a in ("not", "never", "no") and b in _POSITIVE)
    return "positive" if score > 0 else "negative" if score < 0 else "neutral"


def text_answer(prompt: str, images: list[str] | None = None) -> str:
    """A label for sentiment prompts, a caption from image descriptions, else the prompt's first words."""
    if images and len(images) == 1:
        return images[0][0].upper() + images[0][1:] + "."
    if images:
        return " ".join(f"Image {i}: {description}." for i, description in enumerate(images, 1))
    if all(label in prompt.lower() for label in _LABELS):
        return sentiment(_subject(prompt))
    words = _LETTERS.findall(prompt)
    return "Emulated answer about: " + " ".join(words[:12])


def _subject(prompt: str) -> str:
    """The text being labelled: drop the instruction line that names the labels."""
    return "\n".join(line for line in prompt.splitlines() if not all(lbl in line.lower() for lbl in _LABELS))


def value_for(schema: dict[str, Any], seed: int, prompt: str) -> Any:
    """A value that satisfies a (simple) JSON Schema, chosen from the seed."""
    if "enum" in schema and schema["enum"]:
        options = list(schema["enum"])
        if set(_LABELS) <= {str(o) for o in options}:
            return sentiment(_subject(prompt))
        return options[seed % len(options)]
    if "const" in schema:
        return schema["const"]
    kind = schema.get("type", "object" if "properties" in schema else "string")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind == "object":
        props = schema.get("properties", {})
        return {k: value_for(v, seed >> (i % 16) ^ i, prompt) for i, (k, v) in enumerate(props.items())}
    if kind == "array":
        n = max(int(schema.get("minItems", 0)), 1 + seed % 3)
        return [value_for(schema.get("items", {}), seed + i, prompt) for i in range(n)]
    if kind == "integer":
        low = int(schema.get("minimum", 0))
        high = int(schema.get("maximum", low + 100))
        return low + seed % (high - low + 1)
    if kind == "number":
        lowest = float(schema.get("minimum", 0))
        highest = float(schema.get("maximum", lowest + 1))
        return round(lowest + (seed % 1000) / 999 * (highest - lowest), 3)
    if kind == "boolean":
        return bool(seed % 2)
    if kind == "null":
        return None
    return f"value-{seed % 10_000}"
