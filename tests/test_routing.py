"""runtime/routing.py: data-parallel requests go to the engine that was sent their prefix, within `slack` of the
least busy one, else by load; what the router remembers is bounded by an engine's pool and forgotten with it."""

from __future__ import annotations

import pytest

from tessera.runtime.routing import PrefixRouter

PAGE = 4


def prompt(prefix: int, pages: int, own: int = 0) -> list[int]:
    """`pages` full pages of a prefix numbered `prefix` (its tokens its own), then `own` tokens of this prompt's
    own, then the last token (which an engine computes, never finds cached)."""
    return [prefix * 1000 + t for t in range(pages * PAGE)] + [7] * own + [1]


def router(engines: int = 2, pages: int = 64, caching: bool = True, slack: int = 2) -> PrefixRouter:
    return PrefixRouter(engines, PAGE, pages, caching, slack)


def test_a_prefix_goes_back_to_the_engine_it_was_sent_to() -> None:
    r = router()
    assert r.choose(prompt(1, 3), [0, 0]) == 0  # nothing sent yet: the least busy, the first of equals
    assert r.choose(prompt(2, 3), [1, 0]) == 1
    # Idle engines both: load alone would say engine 0; prefix 2 went to engine 1.
    assert r.choose(prompt(2, 3, own=5), [0, 0]) == 1
    assert r.choose(prompt(1, 2), [0, 0]) == 0  # a shorter prompt within prefix 1's pages
    # Engine 1 is sent prefix 1's first page (engine 0 too busy); engine 0, sent all three, still wins them.
    assert r.choose(prompt(1, 1) + [9] * PAGE, [5, 0]) == 1
    assert r.choose(prompt(1, 3), [0, 0]) == 0
    assert r.choose(prompt(1, 3), [2, 0]) == 0


def test_only_leading_pages_count_and_only_full_pages_before_the_last_token() -> None:
    r = router()
    r.choose(prompt(1, 3), [0, 0])
    other_first_page = [99] * PAGE + prompt(1, 3)[PAGE:]  # pages 2-3 equal in tokens, not in prefix
    assert r.choose(other_first_page, [1, 0]) == 1
    # PAGE tokens and the last: one full page before the last token, which prefix 1's first page matches...
    assert r.choose(prompt(1, 1), [1, 0]) == 0
    # ...while a prompt of exactly one page has no full page before its last token: by load.
    assert r.choose(prompt(1, 1)[:PAGE], [1, 0]) == 1


def test_a_busy_engine_past_the_slack_is_passed_over_for_the_least_busy() -> None:
    r = router(slack=2)
    r.choose(prompt(1, 3), [0, 0])
    assert r.choose(prompt(1, 3), [2, 0]) == 0  # 2 more in flight: within the slack
    assert r.choose(prompt(1, 3), [3, 0]) == 1  # 3 more: balanced
    # Engine 1 has now been sent prefix 1 too; with both within the slack the less busy of the two holding it wins.
    assert r.choose(prompt(1, 3), [1, 2]) == 0
    assert r.choose(prompt(1, 3), [2, 1]) == 1


def test_without_prefix_caching_every_request_goes_by_load() -> None:
    r = router(caching=False)
    assert r.choose(prompt(1, 3), [0, 0]) == 0
    assert r.choose(prompt(1, 3), [1, 0]) == 1
    assert r.choose(prompt(1, 3), [0, 1]) == 0
    assert r.sent == [{}, {}]


def test_what_is_remembered_is_bounded_by_the_pool_tail_pages_first() -> None:
    """An engine of 4 pages: a second 3-page prefix sent there pushes out the first's last pages, tail first
    (as the engine evicts), so a later request of the first prefix matches only its first page."""
    r = router(engines=2, pages=4)
    r.choose(prompt(1, 3), [0, 0])
    r.choose(prompt(2, 3), [0, 5])  # engine 0 again (engine 1 too busy)
    assert len(r.sent[0]) == 4
    hashes = list(r.sent[0])
    assert r._matched(0, hashes[-3:][::-1]) == 3  # prefix 2's pages, first page most recent
    assert r.choose(prompt(1, 3), [2, 0]) == 0  # still one page of prefix 1 there: within the slack, chosen


def test_a_lost_engine_is_never_chosen_and_forgotten() -> None:
    r = router()
    r.choose(prompt(1, 3), [0, 0])
    assert r.choose(prompt(1, 3), [None, 3]) == 1
    r.forget(0)
    assert r.sent[0] == {}
    with pytest.raises(ValueError, match="no engine to route to"):
        r.choose(prompt(1, 3), [None, None])
    with pytest.raises(ValueError, match="expected >= 1"):
        PrefixRouter(0, PAGE, 4, True, 1)
