"""A provider's prompt cache, as the emulator models it (docs/caching.md).

A prompt of at least `MIN_TOKENS` tokens is cached once its answer is sent, in blocks
of `BLOCK_TOKENS`; a later prompt that starts with cached blocks reads those from the
cache (at least `MIN_TOKENS` of them, else nothing). A prompt still being answered is
not cached yet: a request sent alongside it misses. The cache holds the prefixes of the
last `capacity` prompts answered or hit (least recently used goes first).

Tokens are counted as the emulator counts them (answers.count_tokens: four characters
a token), so a block is 512 characters of the prompt's text.
"""

from __future__ import annotations

import hashlib
from collections import Counter, OrderedDict

MIN_TOKENS = 1024
BLOCK_TOKENS = 128
BLOCK_CHARS = BLOCK_TOKENS * 4


def block_hashes(prompt: str) -> list[bytes]:
    """The hash of the prompt's text up to each whole block's end, in order."""
    running = hashlib.blake2b(digest_size=16)
    hashes = []
    for start in range(0, len(prompt) - BLOCK_CHARS + 1, BLOCK_CHARS):
        running.update(prompt[start : start + BLOCK_CHARS].encode())
        hashes.append(running.copy().digest())
    return hashes


class PromptCache:
    """The cached prefixes: each entry is one prompt's whole blocks; `blocks` counts entries per block hash."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._entries: OrderedDict[bytes, list[bytes]] = OrderedDict()  # by the last block's hash, LRU first
        self._blocks: Counter[bytes] = Counter()
        self._holder: dict[bytes, bytes] = {}  # block hash -> the latest entry holding it (to refresh on a hit)

    def cached_tokens(self, prompt: str) -> int:
        """Tokens of `prompt` read from the cache, asked when the request arrives; a hit refreshes its entry."""
        hashes = block_hashes(prompt)
        found = next((n for n in range(len(hashes), 0, -1) if self._blocks[hashes[n - 1]]), 0)
        if found * BLOCK_TOKENS < MIN_TOKENS:
            return 0
        holder = self._holder.get(hashes[found - 1])
        if holder is not None and holder in self._entries:
            self._entries.move_to_end(holder)
        return found * BLOCK_TOKENS

    def answered(self, prompt: str) -> None:
        """The prompt's answer was sent: its whole blocks are cached from now on."""
        hashes = block_hashes(prompt)
        if len(hashes) * BLOCK_TOKENS < MIN_TOKENS or self.capacity <= 0:
            return
        key = hashes[-1]
        if key in self._entries:
            self._entries.move_to_end(key)
            return
        self._entries[key] = hashes
        self._blocks.update(hashes)
        self._holder.update(dict.fromkeys(hashes, key))
        while len(self._entries) > self.capacity:
            _, gone = self._entries.popitem(last=False)
            self._blocks.subtract(gone)
            for block in gone:
                if self._blocks[block] <= 0:
                    del self._blocks[block]
                    self._holder.pop(block, None)
