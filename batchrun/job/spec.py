"""The job file: YAML loading with line numbers, pydantic validation, defaults.

Every problem becomes a one-line `JobError` naming the file, the line and the
dotted key, so a user can fix the job before anything is sent. Checks that need
other features' knowledge (schemas, protocols, images, storage) are in app/checks.py,
which runs them on the job read here.
"""

from __future__ import annotations

import os
import urllib.parse
from pathlib import Path
from typing import IO, Any, Literal

import orjson
import polars as pl
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from batchrun.base import storage
from batchrun.base.errors import JobError
from batchrun.base.redaction import MIN_KEY_CHARS, register_secret, too_short
from batchrun.job.openai_batch import MAX_LINE_BYTES, line_too_long

EMULATOR = "emulator"
DEFAULT_BASE_URL = "https://ai.szkmjb.com"


InputFormat = Literal["table", "openai-batch"]
OPENAI_BATCH: InputFormat = "openai-batch"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class InputSpec(_Section):
    path: str | None = None  # None only for a job given a frame in Python (batchrun.run(job, input=frame))
    id_column: str | None = None
    # table: rows of columns rendered by the templates; openai-batch: an OpenAI Batch API request file.
    # Unset: a .jsonl whose first line has the Batch shape is read as one (see `Job.input_format`).
    format: InputFormat | None = None
    storage_options: dict[str, str] | None = None  # for an object-storage path: docs/object-storage.md


def check_base_url(url: str) -> str:
    """The relay's root: scheme, host and an optional path prefix. batchrun adds `/v1/...` and `/v1beta/...`
    itself, so a copied SDK base URL ending in `/v1` (or `/v1beta`) is trimmed; a query string is refused."""
    parts = urllib.parse.urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"{url!r} is not an http(s) URL; use e.g. {DEFAULT_BASE_URL} (or emulator)")
    if parts.query or parts.fragment:
        raise ValueError(
            f"{url!r} has a query string or fragment; give only the scheme, host and path prefix "
            "(batchrun builds each request's path and query itself)"
        )
    path = parts.path.rstrip("/")
    for version in ("/v1", "/v1beta"):
        path = path.removesuffix(version) if path.endswith(version) else path
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, path, "", ""))


class ProviderSpec(_Section):
    api: str = "openai-chat"  # a name in the protocols' registry: app/checks.py checks it (job/ may not import it)
    base_url: str = DEFAULT_BASE_URL
    # One variable, or a list of them (each key its own limits: docs/keys.md), kept as "A,B": a comma is never
    # in a variable's name, and every place that names the variable to a person shows them all.
    api_key_env: str = "KUAIMA_API_KEY"
    image_part_style: Literal["standard", "responses"] = "standard"

    @field_validator("api_key_env", mode="before")
    @classmethod
    def _key_variables(cls, value: Any) -> Any:
        if not isinstance(value, list):
            return value
        if (
            not value
            or not all(isinstance(v, str) and v and "," not in v for v in value)
            or len(set(value)) < len(value)
        ):
            raise ValueError("give one variable name, or a list of different ones (one key each)")
        return ",".join(value)

    @property
    def key_variables(self) -> list[str]:
        """The variables holding the keys, in order (one, unless api_key_env is a list)."""
        return self.api_key_env.split(",")

    @field_validator("base_url")
    @classmethod
    def _relay_root(cls, url: str) -> str:
        return url if url == EMULATOR else check_base_url(url)


class PromptSpec(_Section):
    system: str | None = None
    user: str | None = None
    messages: str | None = None  # a column holding the whole conversation (a list of {role, content})
    images: list[str] = Field(default_factory=list)
    max_image_side: int | None = Field(default=None, ge=16)
    max_image_mb: float = Field(default=20, gt=0)  # one image file or download; larger is the row's `input` error
    # Image URLs from loopback and private addresses (a local image server); link-local never (limits-and-caps.md)
    allow_private_image_hosts: bool = False


class OutputSpec(_Section):
    path: str
    parse: Literal["text", "json", "tool"] = "text"
    json_schema: dict[str, Any] | None = Field(default=None, alias="schema")
    images_dir: str | None = None
    repair_attempts: int = Field(default=0, ge=0)
    native_schema: bool = True
    sharded: bool = False
    openai_batch: str | None = None  # also write the answers as an OpenAI Batch API output file (JSONL)
    storage_options: dict[str, str] | None = None  # for an object-storage path: docs/object-storage.md


class RunSpec(_Section):
    concurrency: int = Field(default=16, ge=1, le=100_000)
    requests_per_minute: float | None = Field(default=None, gt=0)
    tokens_per_minute: float | None = Field(default=None, gt=0)
    max_attempts: int = Field(default=5, ge=1, le=100)
    timeout_s: float = Field(default=120, gt=0)  # idle: the longest wait for the next bytes of an answer
    answer_timeout_s: float = Field(default=600, gt=0)  # a whole streamed answer (a whole JSON one: timeout_s)
    max_answer_mb: float = Field(default=16, gt=0)  # one answer's bytes; beyond, the row is `too_large`
    outage_timeout_s: float = Field(default=600, gt=0)  # how long to wait for a relay that seems down
    max_cost: float | None = Field(default=None, ge=0)
    # cache: rows that share a long prefix are sent so they find it cached (docs/caching.md); input: as read
    order: Literal["cache", "input"] = "cache"


class PricingSpec(_Section):
    input_per_million: float = Field(ge=0)
    output_per_million: float = Field(ge=0)
    cached_input_per_million: float | None = Field(default=None, ge=0)  # None: cached input costs as much as input
    per_image: float | None = Field(default=None, ge=0)
    currency: str = "USD"

    @property
    def cached_price(self) -> float:
        """Per million input tokens read from the provider's prompt cache."""
        return self.input_per_million if self.cached_input_per_million is None else self.cached_input_per_million


class JobSpec(_Section):
    name: str
    input: InputSpec
    provider: ProviderSpec = Field(default_factory=ProviderSpec)
    model: str | None = None  # required, except for an OpenAI Batch file (its bodies name their model)
    prompt: PromptSpec = Field(default_factory=PromptSpec)
    params: dict[str, Any] = Field(default_factory=dict)
    stream: bool = False
    output: OutputSpec
    run: RunSpec = Field(default_factory=RunSpec)
    pricing: PricingSpec | None = None


MAX_JOB_VALUES = 1_000_000  # values in the job file once YAML aliases are expanded; real jobs have hundreds
MAX_JOB_CHARS = 64 << 20  # their text, likewise: beyond, every request body would be absurdly large


class Job:
    """A validated job with its paths resolved against the job's folder.

    `path` is the job file, or for a job given as a dict in Python a name in the current
    folder that only messages show; `frame` is the input given in Python, if any.
    """

    def __init__(
        self,
        spec: JobSpec,
        path: Path,
        frame: pl.DataFrame | None = None,
        shown: str | os.PathLike[str] | None = None,
        lines: dict[str, int] | None = None,
    ) -> None:
        self.spec = spec
        self.path = path
        self.shown = shown if shown is not None else path  # the job as messages name it
        self.lines = lines or {}  # dotted key -> its line in the job file (none for a dict)
        self.given: dict[
            str, str
        ] = {}  # dotted key -> how this run set it instead (`--concurrency`): see with_settings
        self.folder = path.parent
        self.frame = frame
        self.warnings: list[str] = []  # one line each, printed by the commands
        # load_job recognises a Batch file left unmarked
        self.input_format: InputFormat = spec.input.format or "table"
        self.format_recognised = False  # True: input_format was recognised from the file's lines

    @property
    def batch_input(self) -> bool:
        return self.input_format == OPENAI_BATCH

    def where(self, key: str) -> str:
        """`file:line` of a key, for messages; the flag or keyword argument that set it for this run, if one did."""
        return self.given.get(key) or _at(self.shown, self.lines, key)

    def resolve(self, relative: str) -> Path:
        return (self.folder / os.path.expanduser(relative)).resolve()

    @property
    def input_path(self) -> str:
        # Kept as a string: it may be a glob of Parquet files, or an object-storage URL.
        path = self.spec.input.path or ""
        return path if storage.is_url(path) else str(self.folder / os.path.expanduser(path))

    @property
    def output_url(self) -> str | None:
        """output.path when it is an object-storage URL: the output is uploaded there once complete."""
        return self.spec.output.path if storage.is_url(self.spec.output.path) else None

    @property
    def output_path(self) -> Path:
        """Where the output is written on this machine: the output itself, or for a URL its local
        stand-in in batchrun's state folder, beside which the checkpoint and summary live."""
        url = self.output_url
        return storage.local_stand_in(url) if url else self.resolve(self.spec.output.path)

    @property
    def images_dir(self) -> Path:
        """output.images_dir, by default `<output name>_images/` beside the output."""
        d = self.spec.output.images_dir
        return self.resolve(d) if d else self.output_path.with_name(self.output_path.stem + "_images")

    @property
    def openai_batch_path(self) -> Path | None:
        out = self.spec.output.openai_batch
        return self.resolve(out) if out else None

    @property
    def input_folder(self) -> Path:
        """Where relative image paths in the input start: the input's folder, else the job's."""
        if self.frame is not None or storage.is_url(self.input_path):
            return self.folder.resolve()
        return Path(self.input_path).parent.resolve()

    @property
    def uses_emulator(self) -> bool:
        return self.spec.provider.base_url == EMULATOR

    def api_key(self) -> str:
        """The (first) key from the environment; never stored anywhere by batchrun."""
        return self.api_keys()[0][1]

    def api_keys(self) -> list[tuple[str, str]]:
        """Each key's variable and the key in it, in provider.api_key_env's order."""
        return [(env, self._key_in(env)) for env in self.spec.provider.key_variables]

    def _key_in(self, env: str) -> str:
        key = os.environ.get(env, "").strip()  # a pasted key often brings a newline along
        if too_short(key):
            raise JobError(
                f"{self.path}: provider.api_key_env: the key in {env} has fewer than {MIN_KEY_CHARS} characters, "
                "too short to keep out of messages safely; set it to the key exactly as issued"
            )
        register_secret(key)
        if not key and not self.uses_emulator:
            raise JobError(
                f"{self.path}: provider.api_key_env: the variable {env} is not set; "
                f"export {env}=<your key> (or use base_url: emulator to try the job without one)"
            )
        if not all(" " < c < "\x7f" for c in key):
            raise JobError(
                f"{self.path}: provider.api_key_env: the key in {env} has spaces or characters that cannot "
                "be sent in an HTTP header; set it to the key exactly as issued"
            )
        return key


def read_job(path: str | os.PathLike[str]) -> Job:
    """The job file at `path`, its shape validated; checks.load_job adds the checks across keys and features."""
    job_path = Path(path).resolve()
    try:
        text = job_path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise JobError(f"{path}: job file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise JobError(f"{path}: cannot read the job file: {e}") from None
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise JobError(f"{path}:{_yaml_line(e)}: YAML syntax error: {_yaml_problem(e)}") from None
    if not isinstance(data, dict):
        raise JobError(f"{path}: the job file must be a mapping of keys (name, input, model, prompt, output, ...)")
    duplicate = _duplicate_key(root)
    if duplicate:
        key, first, again = duplicate
        raise JobError(
            f"{path}:{again}: the key '{key}' is given twice (lines {first} and {again}); "
            "YAML keeps only the last, so merge them into one"
        )
    return _validated(data, job_path, path, _line_index(root))


def read_job_dict(data: dict[str, Any], folder: Path, frame: pl.DataFrame | None = None) -> Job:
    """A job given in Python as a dict of the job file's keys; relative paths start at `folder`.

    `frame` is the input when it is given in Python rather than by input.path.
    """
    shown = "job dict"
    if frame is not None:
        data = {**data, "input": {k: v for k, v in (data.get("input") or {}).items() if k != "path"}}
    return _validated(data, folder.resolve() / f"<{shown}>", shown, {}, frame)


def _validated(
    data: dict[str, Any],
    job_path: Path,
    path: str | os.PathLike[str],
    lines: dict[str, int],
    frame: pl.DataFrame | None = None,
) -> Job:
    """The job of these keys, or the first problem as a JobError naming `path` and the line."""
    if _too_big(data):
        raise JobError(
            f"{path}: the job file expands to more than {MAX_JOB_VALUES:,} values or {MAX_JOB_CHARS >> 20} MB of text "
            "(YAML aliases repeating aliases?); every request would be absurdly large; refused"
        )
    try:
        spec = JobSpec.model_validate(data)
    except ValidationError as e:
        raise JobError(_describe(path, e, lines)) from None
    for options in (spec.input.storage_options, spec.output.storage_options):
        for name, value in (options or {}).items():
            if any(word in name.lower() for word in ("secret", "token", "password", "account_key", "sas")):
                register_secret(value)  # masked from every message, like the API key
    if spec.input.path is None and frame is None:
        raise JobError(f"{_at(path, lines, 'input')}: missing key 'input.path'")
    return Job(spec, job_path, frame, shown=path, lines=lines)


def _at(path: str | os.PathLike[str], lines: dict[str, int], key: str) -> str:
    """`file:line` for a job file; a job given as a dict has no lines."""
    return f"{path}:{lines.get(key, 1)}" if lines else str(path)


def with_settings(job: Job, settings: dict[str, tuple[str, Any]]) -> Job:
    """The job read, with settings given for this run laid over its file's, before its checks run.

    `settings`: dotted key (`run.concurrency`) -> (how it was given: `--concurrency`, `concurrency=`; its value).
    Each is validated by the same model as the file's, so each setting has one bound and one message;
    an error, and every later message about the key (Job.where), names the setting as it was given.
    """
    update: dict[str, BaseModel] = {}
    for section in sorted({key.partition(".")[0] for key in settings}):
        current: BaseModel = getattr(job.spec, section)
        values = {key.partition(".")[2]: value for key, (_, value) in settings.items() if key.startswith(section + ".")}
        try:
            update[section] = type(current).model_validate({**current.model_dump(exclude_unset=True), **values})
        except ValidationError as e:
            name, _ = settings[f"{section}.{e.errors()[0]['loc'][0]}"]
            raise JobError(_describe(name, e, {}, section=[section])) from None
    job.spec = job.spec.model_copy(update=update)
    job.given.update({key: name for key, (name, _) in settings.items()})
    return job


def _describe(
    path: str | os.PathLike[str], error: ValidationError, lines: dict[str, int], section: list[str] | None = None
) -> str:
    """The first problem in one line: where (`path`, and the key's line), the dotted key, what is wrong.

    `section`: the keys above the model that was validated, when it was one section of the job."""
    err = error.errors()[0]
    loc = [*(section or []), *(str(p) for p in err["loc"])]
    key = ".".join(loc)
    where = f"{path}:{_nearest_line(loc, lines)}" if lines else str(path)
    if err["type"] == "extra_forbidden":
        return f"{where}: unknown key '{key}'; check its spelling ({_known_keys(loc[:-1])})"
    if err["type"] == "missing":
        return f"{where}: missing key '{key}'"
    got = err.get("input")
    # storage_options may hold secrets: their values are never repeated back.
    shown = (
        f" (got {got!r})"
        if got is not None and not isinstance(got, (dict, list)) and "storage_options" not in loc
        else ""
    )
    message = err["msg"].removeprefix("Value error, ")  # our own validators' messages say it all
    return f"{where}: {key}: {message}{shown if message == err['msg'] else ''}"


def _known_keys(section: list[str]) -> str:
    model: type[BaseModel] = JobSpec
    for part in section:
        field = model.model_fields.get(part)
        inner = field.annotation if field else None
        inner = next(
            (a for a in getattr(inner, "__args__", ()) if isinstance(a, type) and issubclass(a, BaseModel)), inner
        )
        if not (isinstance(inner, type) and issubclass(inner, BaseModel)):
            return "see docs/job-file.md"
        model = inner
    names = [f.alias or n for n, f in model.model_fields.items()]
    return "known keys here: " + ", ".join(names)


def _nearest_line(loc: list[str], lines: dict[str, int]) -> int:
    for n in range(len(loc), 0, -1):
        key = ".".join(loc[:n])
        if key in lines:
            return lines[key]
    return 1


def _too_big(data: Any) -> bool:
    """Whether the loaded job, with every alias expanded, passes MAX_JOB_VALUES or MAX_JOB_CHARS.

    Counted without expanding anything and stopping at the limit, so an alias bomb costs the limit, not 2^N.
    """
    values = chars = 0
    stack = [data]
    while stack:
        item = stack.pop()
        values += 1
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
        else:
            chars += len(item) if isinstance(item, str) else 8
        if values > MAX_JOB_VALUES or chars > MAX_JOB_CHARS:
            return True
    return False


def _line_index(node: yaml.Node | None, prefix: str = "", seen: set[int] | None = None) -> dict[str, int]:
    """Dotted key -> 1-based line number, for mappings (lists are indexed by position).

    A node reached again through an alias is not walked again: an alias bomb would take 2^N steps.
    """
    seen = set() if seen is None else seen
    out: dict[str, int] = {}
    if id(node) in seen:
        return out
    seen.add(id(node))
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = f"{prefix}{key_node.value}"
            out[key] = key_node.start_mark.line + 1
            out.update(_line_index(value_node, key + ".", seen))
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            out[f"{prefix}{i}"] = item.start_mark.line + 1
            out.update(_line_index(item, f"{prefix}{i}.", seen))
    return out


def _duplicate_key(root: yaml.Node | None) -> tuple[str, int, int] | None:
    """The first key given twice in one mapping, as (dotted key, its first line, its second line).

    Each node is walked once (an alias bomb would take 2^N steps); `<<` merge keys may repeat.
    """
    stack: list[tuple[yaml.Node | None, str]] = [(root, "")]
    seen: set[int] = set()
    while stack:
        node, prefix = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, yaml.MappingNode):
            lines: dict[str, int] = {}
            for key_node, value_node in node.value:
                key, line = f"{prefix}{key_node.value}", key_node.start_mark.line + 1
                if key in lines and key_node.tag != "tag:yaml.org,2002:merge":
                    return key, lines[key], line
                lines.setdefault(key, line)
                stack.append((value_node, key + "."))
        elif isinstance(node, yaml.SequenceNode):
            stack.extend((item, f"{prefix}{i}.") for i, item in enumerate(node.value))
    return None


def recognise_batch_file(input_path: str) -> bool:
    """A .jsonl whose first non-blank line is an object with `custom_id`, `url` and `body`: an OpenAI Batch file."""
    if Path(input_path).suffix.lower() not in (".jsonl", ".ndjson"):
        return False
    try:
        with open(input_path, "rb") as f:
            first = _first_line(f)
        data = orjson.loads(first)
    except (OSError, orjson.JSONDecodeError):
        return False  # the input reader names the problem
    except OverflowError as e:  # a line over the cap: named here, before anything reads it whole
        raise line_too_long(f"input.path {input_path}", e.args[0]) from None
    return isinstance(data, dict) and {"custom_id", "url", "body"} <= data.keys()


def _first_line(f: IO[bytes]) -> bytes:
    """The first non-blank line, never reading more than MAX_LINE_BYTES of one line (OverflowError with
    the line's number: that line is longer)."""
    number = 0
    while line := f.readline(MAX_LINE_BYTES + 1):
        number += 1
        if len(line) > MAX_LINE_BYTES and not line.endswith(b"\n"):
            raise OverflowError(number)
        if line.strip():
            return line
    return b""


def input_problems(job: Job) -> list[tuple[str, str]]:
    """What the job's prompt and input format need of each other."""
    spec, prompt = job.spec, job.spec.prompt
    if job.batch_input:
        what = "recognised as an OpenAI Batch file" if job.format_recognised else "input.format is openai-batch"
        if job.frame is not None:
            return [("input.format", "an OpenAI Batch file is read from input.path, not from a frame given in Python")]
        # A recognised file may be meant as plain rows: say how to read it so.
        way_out = " (or set input.format: table to read its lines as rows)" if job.format_recognised else ""
        for key in ("user", "system", "messages", "images"):
            if getattr(prompt, key):
                return [
                    (
                        f"prompt.{key}",
                        f"{what}: its lines are the requests, so templates are not used; remove prompt{way_out}",
                    )
                ]
        if spec.input.id_column not in (None, "custom_id"):
            return [("input.id_column", f"{what}: custom_id is the row id; remove input.id_column")]
        if spec.output.repair_attempts:
            return [("output.repair_attempts", "repair is not supported yet for an OpenAI Batch file")]
        return []
    if spec.model is None:
        return [("model", "missing: the model every request asks for")]
    if prompt.user is None and prompt.messages is None:
        return [("prompt.user", "missing: the user prompt template (or prompt.messages, a column of conversations)")]
    if prompt.user is not None and prompt.messages is not None:
        return [("prompt.messages", "set prompt.user or prompt.messages, not both")]
    if prompt.messages is not None and prompt.images:
        return [("prompt.images", "with prompt.messages, images go in the conversation's content parts")]
    return []


def _yaml_line(e: yaml.YAMLError) -> int:
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    return mark.line + 1 if mark else 1


def _yaml_problem(e: yaml.YAMLError) -> str:
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    context = getattr(e, "context", None)
    return f"{context}, {problem}" if context else problem
