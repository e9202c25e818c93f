"""Which engine process a request goes to, when `--data-parallel-size` starts several (runtime/async_engine.py).

Each engine has a prefix cache of its own (runtime/cache.py), so a prompt finds its prefix cached only on an
engine that served that prefix before. Sent to whichever engine has the fewest requests in flight, requests that
share a system prompt or a conversation's history are spread over every engine, each computing and keeping that
prefix once, and at N engines each pool holds the same prefixes N times. So the router, like SGLang's
cache-aware one, sends a request to the engine that most probably holds the longest run of its prompt's pages,
unless that engine is busier than the least busy by more than `slack` requests: then it balances, as before.

The router cannot see the engines' caches (they live in other processes, and asking would cost a round trip per
request); it remembers instead the page hashes of the prompts it sent to each engine, as the engine will
register them (runtime.cache.page_hashes, the pages before a prompt's last token), in least-recently-sent order
and no more of them than the engine's pool has pages: an engine evicts its cached pages least recently used
first, and never holds more than its pool. A guess that is wrong costs only what routing by load costs.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from tessera.runtime.cache import page_hashes, prefix_pages


class PrefixRouter:
    """engines: how many; page_size: their KV page; pages: the pages of the smallest engine pool (how many prefix
    pages one engine can hold); caching: whether the engines cache prefixes at all (without it every request goes
    by load); slack: how many more requests in flight than the least busy engine has an engine may hold and still
    be chosen for its cached prefix."""

    def __init__(self, engines: int, page_size: int, pages: int, caching: bool, slack: int) -> None:
        if engines < 1 or page_size < 1 or pages < 1 or slack < 0:
            raise ValueError(f"PrefixRouter({engines}, {page_size}, {pages}, {caching}, {slack}): expected >= 1 each")
        self.page_size, self.pages, self.caching, self.slack = page_size, pages, caching, slack
        self.sent: list[OrderedDict[bytes, None]] = [OrderedDict() for _ in range(engines)]

    def choose(self, prompt: Sequence[int], loads: Sequence[int | None]) -> int:
        """The engine for `prompt`, given each engine's requests in flight (None: the engine is gone); remembers
        that the prompt's pages went there. The least busy engine (the first of those) when no engine within
        `slack` of it was sent any of the prompt's leading pages."""
        alive = [i for i, load in enumerate(loads) if load is not None]
        if not alive:
            raise ValueError("no engine to route to")
        least = min(alive, key=lambda i: loads[i])
        if not self.caching:
            return least
        hashes = page_hashes(prompt, self.page_size, [], prefix_pages(prompt, self.page_size))
        matched = {i: self._matched(i, hashes) for i in alive if loads[i] <= loads[least] + self.slack}
        best = max(matched, key=lambda i: (matched[i], -loads[i], -i))
        chosen = best if matched[best] else least
        self._remember(chosen, hashes)
        return chosen

    def _matched(self, engine: int, hashes: list[bytes]) -> int:
        """How many of `hashes` (a prompt's pages, in order) were sent to `engine`, counted from the first: page
        i's hash stands for every token before its end, so a later page found past a missing one is no hit."""
        sent = self.sent[engine]
        for n, h in enumerate(hashes):
            if h not in sent:
                return n
        return len(hashes)

    def _remember(self, engine: int, hashes: list[bytes]) -> None:
        """The prompt's pages, its first the most recent: past the pool's size the least recently sent go first,
        a prompt's last pages before its first, as an engine evicts its cached pages (tail first)."""
        sent = self.sent[engine]
        for h in reversed(hashes):
            sent[h] = None
            sent.move_to_end(h)
        while len(sent) > self.pages:
            sent.popitem(last=False)

    def forget(self, engine: int) -> None:
        """An engine is gone: nothing is cached there any more."""
        self.sent[engine].clear()
