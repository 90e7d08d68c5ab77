"""The order a provider's prompt cache rewards (`run.order: cache`, the default; docs/caching.md).

A provider caches a prompt's prefix once it has answered it (at least 1,024 tokens), so
rows that share a long prefix should not leave together (none finds it cached yet) nor
far apart (the cache has forgotten it). Rows are read ahead, up to `WINDOW_ROWS` held
(and `WINDOW_CHARS` of their text), and grouped by prefix:

* A prefix is known by the hash of the request's leading text at each 1,024-token
  boundary (chars / 4, as flow/limits.py estimates tokens): cheap, no tokenizer.
* A row whose prefix no earlier row shares leads a group and goes out in input order.
  A row sharing a prefix with a leader whose answer has not arrived waits for it (the
  leader of the deepest prefix it shares); once that leader is answered its rows go
  before any new group. Where a row's prefix goes deeper than the leader's, it leads
  the deeper level for the rows after it (instructions shared by all, then a document
  shared by a few).
* At most `leaders_at_once` leaders (the run's concurrency) are awaited at once, so a
  leader's rows follow it before other groups' prefixes push it out of the cache.
* A row waits at most `WAIT_S` for its leader: a leader held back (base/stops.py) or
  never sent must not hold its group forever.

Only the sending order changes: each row's intent, checkpoint record and output place
are the engine's as before, so `--limit`, resume and exactly-once are untouched.
`answered` is the signal the order needs; `AnsweredLedger` gives it from the ledger.
"""

from __future__ import annotations

import hashlib
from collections import Counter, OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import anyio
import orjson
from anyio.streams.memory import MemoryObjectSendStream

from batchrun.flow.limits import CHARS_PER_TOKEN, prompt_tokens_estimate
from batchrun.job.render import Request
from batchrun.ledger.checkpoint import RowRecord
from batchrun.pipeline.rows import WorkItem
from batchrun.pipeline.seams import Ledger

PREFIX_TOKENS = 1024  # the providers' smallest cached prefix
PREFIX_CHARS = PREFIX_TOKENS * CHARS_PER_TOKEN
MAX_LEVELS = 32  # prefixes are compared up to 32 K tokens; deeper adds nothing to the grouping
WINDOW_ROWS = 4096  # rows read ahead and held, at most
WINDOW_CHARS = 32 << 20  # and their prompts' characters, at most
KNOWN_PREFIXES = 4 * WINDOW_ROWS  # prefixes remembered (the oldest forgotten first)
WAIT_S = 120.0


def leading_text(request: Request) -> str:
    """The request's text in the order it is sent: what the provider's cache sees as its prefix."""
    if request.body is not None:
        return orjson.dumps(request.body.get("messages") or request.body.get("contents") or request.body).decode()
    turns = "\n".join(text for turn in request.messages for _, text in turn.parts)
    return f"{request.system or ''}\n{turns}\n{request.user}"


def prefix_levels(text: str) -> list[bytes]:
    """The hash of the text up to each whole 1,024-token boundary, in order (at most MAX_LEVELS)."""
    running = hashlib.blake2b(digest_size=16)
    levels = []
    for start in range(0, min(len(text), MAX_LEVELS * PREFIX_CHARS) - PREFIX_CHARS + 1, PREFIX_CHARS):
        running.update(text[start : start + PREFIX_CHARS].encode())
        levels.append(running.copy().digest())
    return levels


class CacheOrder:
    """Rows in, rows out in the order the cache rewards; `answered(idx)` as each row finishes."""

    def __init__(self, leaders_at_once: int) -> None:
        self.leaders_at_once = leaders_at_once
        self.held = 0  # rows added and not yet taken
        self.held_chars = 0
        self._index: OrderedDict[bytes, int] = OrderedDict()  # prefix level -> the row that leads it
        self._unanswered: set[int] = set()  # leaders not answered yet (held or sent)
        self._in_flight = 0  # leaders taken and not answered
        self._waiting: OrderedDict[int, list[WorkItem]] = OrderedDict()  # leader -> rows waiting for it
        self._fresh: deque[WorkItem] = deque()  # rows waiting for nobody, in input order
        self._released: deque[WorkItem] = deque()  # rows whose leader was answered: they go first
        self._chars: dict[int, int] = {}  # idx -> prompt characters, of held rows
        self.answer = anyio.Event()  # set at each leader's answer (a new one after each wait)

    @property
    def full(self) -> bool:
        return self.held >= WINDOW_ROWS or self.held_chars >= WINDOW_CHARS

    def add(self, item: WorkItem) -> None:
        text = leading_text(item.request)
        levels = prefix_levels(text)
        depth = next((n for n in range(len(levels), 0, -1) if levels[n - 1] in self._index), 0)
        leader = self._index[levels[depth - 1]] if depth else None
        if depth < len(levels):  # deeper than any known prefix: this row leads it
            self._unanswered.add(item.idx)
            for level in levels[depth:]:
                self._index[level] = item.idx
            while len(self._index) > KNOWN_PREFIXES:
                self._index.popitem(last=False)
        if leader is not None:
            self._index.move_to_end(levels[depth - 1])
        if leader is not None and leader in self._unanswered:
            self._waiting.setdefault(leader, []).append(item)
        elif leader is not None:
            self._released.append(item)
        else:
            self._fresh.append(item)
        self.held += 1
        self.held_chars += len(text)
        self._chars[item.idx] = len(text)

    def take(self) -> WorkItem | None:
        """The next row to send, or None when every held row waits for an answer."""
        if self._released:
            item = self._released.popleft()
        elif self._fresh and (self._fresh[0].idx not in self._unanswered or self._in_flight < self.leaders_at_once):
            item = self._fresh.popleft()
        else:
            return None
        if item.idx in self._unanswered:
            self._in_flight += 1
        self.held -= 1
        self.held_chars -= self._chars.pop(item.idx)
        return item

    def answered(self, idx: int) -> None:
        """Row `idx` finished (or was withdrawn): the rows waiting for it may go."""
        if idx not in self._unanswered:
            return
        self._unanswered.discard(idx)
        self._in_flight -= 1
        self._released.extend(self._waiting.pop(idx, ()))
        self.answer.set()

    def give_up_oldest(self) -> None:
        """A leader did not answer in WAIT_S: the oldest group's rows go without it."""
        if self._waiting:
            self._released.extend(self._waiting.popitem(last=False)[1])
        elif self._fresh:  # the leaders awaited hold every place: one more may be awaited from now on
            self.leaders_at_once += 1

    async def next_answer(self, seconds: float) -> bool:
        """Waits for a leader's answer, up to `seconds`; False if none came."""
        with anyio.move_on_after(seconds):
            await self.answer.wait()
        came = self.answer.is_set()
        self.answer = anyio.Event()
        return came


class AnsweredLedger:
    """The ledger, telling the order of every row that finished (the signal its waiting rows need)."""

    def __init__(self, ledger: Ledger, order: CacheOrder) -> None:
        self._ledger = ledger
        self._order = order
        self.begin = ledger.begin  # the ledger's own: no coroutine layer of its own for every row to pass

    def finish(self, record: RowRecord) -> None:
        self._ledger.finish(record)
        self._order.answered(record.idx)

    def withdraw(self, idx: int) -> None:
        self._ledger.withdraw(idx)
        self._order.answered(idx)


class Sending:
    """The producer's end of the work stream: rows straight in (`order` None: `run.order: input`), or
    through a CacheOrder. `stopped` says the run sends no more (the budget); `expect` hears of each row
    as it goes into the stream, in order (the checkpoint commits intents ahead: ledger/checkpoint.py)."""

    def __init__(
        self,
        stream: MemoryObjectSendStream[WorkItem],
        order: CacheOrder | None,
        stopped: Callable[[], bool],
        expect: Callable[[int], None] = lambda idx: None,
    ) -> None:
        self._stream = stream
        self._order = order
        self._stopped = stopped
        self._expect = expect

    def put_now(self, item: WorkItem) -> bool:
        """`put` without a coroutine, when the row goes straight into a stream with room; False: `put` it."""
        order = self._order
        if order is not None and (order.held or prefix_levels_possible(item)):
            return False
        self._expect(item.idx)
        try:
            self._stream.send_nowait(item)
        except anyio.WouldBlock:  # full: `put` waits for room
            return False
        return True

    async def put(self, item: WorkItem) -> None:
        order = self._order
        if order is None or (not order.held and not prefix_levels_possible(item)):
            await self._send(item)
            return
        order.add(item)
        self._fill()
        while order.full and not self._stopped():
            await self._send_or_wait(order)

    async def drain(self) -> None:
        """At the end of the input: every held row sent, each after its leader's answer."""
        order = self._order
        while order is not None and order.held and not self._stopped():
            await self._send_or_wait(order)

    def _fill(self) -> None:
        """Rows ready, into the stream while it has room (no wait)."""
        assert self._order is not None
        stats = self._stream.statistics()
        room = stats.max_buffer_size - stats.current_buffer_used
        while room > 0 and (item := self._order.take()) is not None:
            self._expect(item.idx)
            self._stream.send_nowait(item)
            room -= 1

    async def _send_or_wait(self, order: CacheOrder) -> None:
        item = order.take()
        if item is not None:
            await self._send(item)
        elif not await order.next_answer(WAIT_S):
            order.give_up_oldest()

    async def _send(self, item: WorkItem) -> None:
        self._expect(item.idx)
        try:  # while the stream has room, without a pass through the event loop (anyio's send makes one)
            self._stream.send_nowait(item)
        except anyio.WouldBlock:
            await self._stream.send(item)


def prefix_levels_possible(item: WorkItem) -> bool:
    """Whether the row's prompt is long enough to share a cached prefix at all (checked before hashing)."""
    return item.request.body is not None or item.request.text_chars >= PREFIX_CHARS


# --- what `validate` says ----------------------------------------------------------


@dataclass(frozen=True)
class PrefixShare:
    """How the first rows' prompts share text, seen in 1,024-token steps (lower bounds, like the cache's)."""

    rows: int  # rows looked at
    long_enough: int  # rows of at least 1,024 tokens: the only ones a provider caches
    sharing: int  # rows whose prefix of >= 1,024 tokens another row shares
    input_tokens: int  # estimated, of the rows looked at
    shared_tokens: int  # of each row, the prefix another row shares, summed
    expected_cached: int  # of each row, the prefix an earlier row already sent, summed: what the cache can serve
    shared_late: int  # rows sharing more text at their end than at their start: row-specific text comes first


def prefix_share(texts: list[str]) -> PrefixShare:
    """The rows' prompts as the cache sees them, in input order."""
    prefixes = [prefix_levels(text) for text in texts]
    suffixes = [prefix_levels(_backwards(text)) for text in texts]
    prefix_counts = Counter(level for levels in prefixes for level in levels)
    suffix_counts = Counter(level for levels in suffixes for level in levels)
    seen: set[bytes] = set()
    shared = expected = late = sharing = 0
    for levels, ends in zip(prefixes, suffixes, strict=True):
        depth = _shared_depth(levels, lambda level: prefix_counts[level] > 1)
        sharing += depth > 0
        shared += depth * PREFIX_TOKENS
        expected += _shared_depth(levels, seen.__contains__) * PREFIX_TOKENS
        seen.update(levels)
        late += _shared_depth(ends, lambda level: suffix_counts[level] > 1) > depth
    long_enough = sum(1 for levels in prefixes if levels)
    tokens = sum(prompt_tokens_estimate(len(text)) for text in texts)
    return PrefixShare(len(texts), long_enough, sharing, tokens, shared, expected, late)


def _shared_depth(levels: list[bytes], shared: Callable[[bytes], bool]) -> int:
    """How many leading levels are shared (levels chain: once one is not, none deeper is)."""
    return next((n for n, level in enumerate(levels) if not shared(level)), len(levels))


def _backwards(text: str) -> str:
    """The text's 1,024-token pieces from its end: a shared ending hashes like a shared start."""
    pieces = [text[max(0, end - PREFIX_CHARS) : end] for end in range(len(text), 0, -PREFIX_CHARS)]
    return "".join(piece for piece in pieces if len(piece) == PREFIX_CHARS)


def advice_lines(share: PrefixShare, job_path: Path, order: str) -> list[str]:
    """What `validate` prints about the prompt cache: nothing when no prompt is long enough to be cached."""
    if not share.long_enough:
        return []
    lines = [
        f"prompt cache (the first {share.rows} rows, in 1,024-token steps; docs/caching.md):",
        f"  {share.sharing} rows share a prefix of at least 1,024 tokens with other rows: "
        f"{share.shared_tokens / max(share.input_tokens, 1):.0%} of the input is a shared prefix; "
        f"~{share.expected_cached / max(share.input_tokens, 1):.0%} can be read from the cache "
        f"(each prefix's first row pays in full)",
    ]
    if order == "input" and share.sharing:
        lines.append("  run.order is input: rows are sent as read, so siblings may miss the cache")
    if share.shared_late:
        lines.append(
            f"  warning: {job_path}: prompt: {share.shared_late} rows share more text at the end of their prompt "
            "than at its start: row-specific text comes before a long shared part, where the cache cannot help; "
            "put shared instructions and documents first and the row's own text last (docs/caching.md)"
        )
    return lines
