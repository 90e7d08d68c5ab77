"""What shapes every request body of a job, frozen once: the protocols build from it, the fingerprint hashes it.

One value for both, so a request-shaping setting a protocol reads cannot be
forgotten by the fingerprint (which would let a rerun reuse answers to a
different request: paying for nothing, or keeping stale answers). A new field is
hashed by default; `by_job_keys` names each field as the job file does, and a
test changes every field and checks the fingerprint moves.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from batchrun.job.spec import JobSpec
from batchrun.job.structured import WireFormats, uses_native_schema


@dataclass(frozen=True)
class ImageSettings:
    """How a job's images are sent; only a job whose prompt has images has them."""

    part_style: str  # provider.image_part_style: chat part names (docs/protocol.md §2.1)
    max_side: int | None  # prompt.max_image_side: downscale first (None: send as read)


@dataclass(frozen=True)
class RequestSettings:
    model: str | None  # None: an OpenAI Batch file's lines name their own
    api: str
    params: dict[str, Any]  # as written in the job; never modified (frozen by convention: dicts cannot be)
    stream: bool
    images: ImageSettings | None  # None: the prompt can have no images, so no image setting shapes a body
    native_schema: dict[str, Any] | None  # output.schema when the API itself is asked for it, else None

    @classmethod
    def of(cls, spec: JobSpec, wire: WireFormats) -> RequestSettings:
        """`wire`: the job's protocol (protocols.protocol_for(spec.provider.api))."""
        has_images = bool(spec.prompt.images) or spec.prompt.messages is not None  # a conversation may hold images
        images = ImageSettings(spec.provider.image_part_style, spec.prompt.max_image_side) if has_images else None
        schema = spec.output.json_schema if uses_native_schema(spec, wire) else None
        return cls(spec.model, spec.provider.api, spec.params, spec.stream, images, schema)

    def by_job_keys(self) -> dict[str, Any]:
        """Every field by its job-file name (what a rerun shows as changed); unset optional ones left out.

        The names and the leaving out are those of the first checkpoints, so their fingerprints still match.
        """
        found: dict[str, Any] = {}
        for field in fields(self):
            value = getattr(self, field.name)
            if isinstance(value, ImageSettings):
                found.update({_JOB_KEYS[f"images.{f.name}"]: getattr(value, f.name) for f in fields(value)})
            elif value is not None or field.name not in _OPTIONAL:
                found[_JOB_KEYS[field.name]] = value
        return found


_JOB_KEYS = {
    "model": "model",
    "api": "provider.api",
    "params": "params",
    "stream": "stream",
    "images.part_style": "provider.image_part_style",
    "images.max_side": "prompt.max_image_side",
    "native_schema": "output.schema",
}
_OPTIONAL = {"images", "native_schema"}
