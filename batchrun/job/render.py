"""Rows to provider-neutral requests.

Three sources: Jinja2 templates over the row's columns (prompt.system, prompt.user,
prompt.images); a column holding the whole conversation (prompt.messages); or an
OpenAI Batch line, whose body is the request as written (input.format: openai-batch).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import jinja2
import jinja2.meta
import jinja2.nodes
import jinja2.sandbox
import orjson

from batchrun.base.errors import JobError
from batchrun.job.openai_batch import URL_APIS
from batchrun.job.spec import Job

ROLES = ("system", "user", "assistant")
_TEXT_PARTS = ("text", "input_text")
_INLINE_IMAGE = re.compile(rb'"data:image/[^",]*;base64,[^"]*"')  # a JSON string holding one data URL
_IMAGE_PARTS = ("image_url", "input_image")


class RowInputError(ValueError):
    """This row's input cannot make a request (a malformed conversation): an `input` error row, nothing sent."""


def as_text(value: Any) -> Any:
    """What `{{ column }}` prints: an empty cell (CSV) or a null (Parquet, JSON) is empty text, never `None`."""
    return "" if value is None else value


# Sandboxed: a template (or a job file from someone else) cannot reach Python's internals, os.environ and the key.
_ENV = jinja2.sandbox.SandboxedEnvironment(
    undefined=jinja2.StrictUndefined, keep_trailing_newline=False, autoescape=False, finalize=as_text
)


@dataclass(frozen=True)
class ImageInput:
    """An image ready to send: a URL passed on as is, or bytes with their MIME type."""

    mime: str = ""
    data: bytes = b""
    url: str | None = None


@dataclass(frozen=True)
class Turn:
    """One message of a conversation: its role and its parts in order, each ("text", text) or ("image", ref)."""

    role: str  # system | user | assistant
    parts: tuple[tuple[str, str], ...]
    plain: bool  # the content was one string: sent as one string where the protocol allows


@dataclass(frozen=True)
class Request:
    """What one row asks, before any protocol shapes it."""

    system: str | None
    user: str
    images: tuple[str, ...] = field(default_factory=tuple)  # as rendered: paths, URLs or data URLs
    image_inputs: tuple[ImageInput, ...] = field(default_factory=tuple)  # `images` loaded, right before sending
    # prompt.messages: the whole conversation after `system` (`user` is then empty); its image
    # parts are `images`, in order of appearance.
    messages: tuple[Turn, ...] = ()
    # An OpenAI Batch line: the body as written and the protocol its url names. The protocol
    # sends it with the job's model and params laid over it; nothing else of the request is used.
    body: dict[str, Any] | None = None
    api: str | None = None

    @property
    def text_chars(self) -> int:
        chars = len(self.user) + len(self.system or "")
        if self.messages:  # (asked for every row: no generator made for the rows without a conversation)
            chars += sum(len(text) for turn in self.messages for kind, text in turn.parts if kind == "text")
        if self.body is not None:  # its inline images are no text: they count in body_images
            chars += len(_INLINE_IMAGE.sub(b'""', orjson.dumps(self.body)))
        return chars

    @property
    def body_images(self) -> int:
        """Inline (data URL) images in a Batch line's body, estimated like prompt.images."""
        return len(_INLINE_IMAGE.findall(orjson.dumps(self.body))) if self.body is not None else 0


class Renderer:
    """Compiled templates of one job, checked against the input's columns."""

    def __init__(self, job: Job, columns: list[str]) -> None:
        prompt = job.spec.prompt
        self._batch = job.batch_input
        self._messages = prompt.messages
        if prompt.messages is not None and prompt.messages not in columns:
            raise JobError(
                f"{job.path}: prompt.messages: column {prompt.messages!r} is not in the input; "
                f"its columns are: {', '.join(columns)}"
            )
        sources: dict[str, str] = {"prompt.user": prompt.user} if prompt.user is not None else {}
        if prompt.system is not None:
            sources["prompt.system"] = prompt.system
        for i, image in enumerate(prompt.images):
            sources[f"prompt.images.{i}"] = image
        known = set(columns)
        used: set[str] = {prompt.messages} if prompt.messages is not None and not self._batch else set()
        compiled: dict[str, jinja2.Template | Substitution] = {}
        for key, source in sources.items():
            try:
                ast = _ENV.parse(source)
            except jinja2.TemplateSyntaxError as e:
                raise JobError(
                    f"{job.path}: {key}: template syntax error on its line {e.lineno}: {e.message}"
                ) from None
            variables = jinja2.meta.find_undeclared_variables(ast)
            used |= variables & known
            missing = sorted(variables - known)
            if missing:
                raise JobError(
                    f"{job.path}: {key}: the template uses {', '.join(repr(m) for m in missing)}, "
                    f"which the input does not have; its columns are: {', '.join(columns)}"
                )
            template = _ENV.from_string(source)
            # Jinja keeps globals in a ChainMap, copied key by key into every render's context;
            # a plain dict is copied in C: render is about 3x faster (profiled on `batchrun bench`).
            template.globals = dict(template.globals)
            compiled[key] = Substitution.of(ast, template) or template
        self._user = compiled.get("prompt.user")
        self._system = compiled.get("prompt.system")
        self._images = [compiled[f"prompt.images.{i}"] for i in range(len(prompt.images))]
        self.columns_used = sorted(used)  # the input columns the prompt puts into requests

    def render(self, row: dict[str, Any]) -> Request:
        """Raises jinja2 errors (e.g. a filter failing on this row's value) and RowInputError (a malformed
        conversation); the runner records them as row errors."""
        if self._batch:
            return Request(system=None, user="", body=orjson.loads(row["body"]), api=URL_APIS[row["url"]])
        system = self._system.render(row) if self._system else None
        if self._messages is not None:
            turns = conversation(row[self._messages], self._messages)
            refs = tuple(ref for turn in turns for kind, ref in turn.parts if kind == "image")
            return Request(system=system, user="", images=refs, messages=turns)
        assert self._user is not None  # spec requires prompt.user or prompt.messages
        if not self._images:
            return Request(system=system, user=self._user.render(row))
        images = (t.render(row).strip() for t in self._images)
        return Request(system=system, user=self._user.render(row), images=tuple(i for i in images if i))


class Substitution:
    """A template that only puts columns into text ("Review: {{ text }}"), as most prompts do, rendered without
    Jinja's set-up for each render (a context, a generator): 5x faster, the same text (`{{ x }}` is
    `str(as_text(x))`)."""

    __slots__ = ("_parts", "_template")

    def __init__(self, parts: tuple[tuple[bool, str], ...], template: jinja2.Template) -> None:
        self._parts = parts  # (True, a column) or (False, text as written)
        self._template = template

    @classmethod
    def of(cls, ast: jinja2.nodes.Template, template: jinja2.Template) -> Substitution | None:
        """The template as a substitution; None if it does anything else (a filter, a tag, an expression)."""
        parts: list[tuple[bool, str]] = []
        for output in ast.body:
            if not isinstance(output, jinja2.nodes.Output):
                return None
            for node in output.nodes:
                if isinstance(node, jinja2.nodes.TemplateData):
                    parts.append((False, node.data))
                elif isinstance(node, jinja2.nodes.Name) and node.ctx == "load" and node.name != "self":
                    parts.append((True, node.name))  # `self` is Jinja's reference to the template itself
                else:
                    return None
        return cls(tuple(parts), template)

    def render(self, row: dict[str, Any]) -> str:
        try:  # as_text inlined, and a list for join (not a generator): this runs for every row's every template
            return "".join(
                [
                    ("" if (value := row[text]) is None else str(value)) if column else text
                    for column, text in self._parts
                ]
            )
        except KeyError:  # not a column of this row: Jinja says so in its words
            return self._template.render(row)


def conversation(value: Any, column: str) -> tuple[Turn, ...]:
    """A column's value as a conversation: a list of {role, content} (a JSON string of one, from CSV, too).

    Content is a string or a list of chat parts (`text`, `image_url`; the Responses names too). Keys
    that are null are absent: a Parquet list of structs gives every message every field.
    """
    where = f"prompt.messages (column {column!r})"
    if isinstance(value, str):
        try:
            value = orjson.loads(value)
        except orjson.JSONDecodeError:
            raise RowInputError(f"{where}: not a list of messages but text") from None
    if not isinstance(value, list):
        raise RowInputError(f"{where}: not a list of messages (got {type(value).__name__})")
    if not value:
        raise RowInputError(f"{where}: the conversation is empty")
    return tuple(_turn(message, f"{where}: message {n}") for n, message in enumerate(value, 1))


def _turn(message: Any, where: str) -> Turn:
    if not isinstance(message, dict):
        raise RowInputError(f"{where}: not an object with role and content")
    role = message.get("role")
    if role not in ROLES:
        raise RowInputError(f"{where}: unknown role {role!r} (known: {', '.join(ROLES)})")
    content = message.get("content")
    if isinstance(content, str):
        return Turn(role, (("text", content),), plain=True)
    if not isinstance(content, list) or not content:
        raise RowInputError(f"{where}: content must be a string or a non-empty list of parts")
    return Turn(role, tuple(_part(p, f"{where}, part {i}") for i, p in enumerate(content, 1)), plain=False)


def _part(part: Any, where: str) -> tuple[str, str]:
    part = {k: v for k, v in part.items() if v is not None} if isinstance(part, dict) else part
    kind = part.get("type") if isinstance(part, dict) else None
    if kind in _TEXT_PARTS and isinstance(part.get("text"), str):
        return ("text", part["text"])
    if kind in _IMAGE_PARTS:
        image = part.get("image_url")
        url = image.get("url") if isinstance(image, dict) else image
        if isinstance(url, str) and url.strip():
            return ("image", url.strip())
    raise RowInputError(
        f"{where}: not a text part ({{type: text, text}}) or an image part ({{type: image_url, image_url: {{url}}}})"
    )
