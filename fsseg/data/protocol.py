"""The evaluation-episode protocol of the published FSS benchmarks (docs/PROTOCOL.md §1).

Every published number draws its test episodes from NumPy's global generator seeded with 0, in one process, in
episode order. We replay exactly those draws with a private ``np.random.RandomState(seed)`` (the global generator
*is* a RandomState), once, when the dataset is built, so loader workers and DDP processes only read the list.

``RandomState.choice(a, 1, replace=False)`` draws ``permutation(len(a))[:1]``; drawing an index into the list
consumes the same random numbers as drawing from the list itself, so we draw indices.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np


@dataclass(frozen=True)
class Episode:
    """One few-shot episode: a class, a query image key and K support image keys."""

    class_id: int
    query: str
    supports: tuple[str, ...]
    support_class: int | None = None  # the class whose masks the supports show (None: ``class_id``)
    empty_supports: bool = False  # the supports' masks are replaced by all-background masks


def choose(rs: np.random.RandomState, seq: Sequence):
    """``np.random.choice(seq, 1, replace=False)[0]`` with the benchmark code's exact random consumption."""
    return seq[int(rs.choice(len(seq), 1, replace=False)[0])]


def draw_supports(rs: np.random.RandomState, pool: Sequence[str], query: str, shot: int) -> tuple[str, ...]:
    """Draw ``shot`` supports one by one from ``pool``, redrawing any equal to the query (duplicates allowed)."""
    if not any(p != query for p in pool):
        raise ValueError(f"cannot draw supports for query {query!r}: its class has no other image")
    supports: list[str] = []
    while len(supports) < shot:
        s = choose(rs, pool)
        if s != query:
            supports.append(s)
    return tuple(supports)


def draw_random_supports(
    rng: np.random.Generator, pool: Sequence[str], query: str, shot: int
) -> tuple[str, ...]:
    """Training-time support draw (any generator): ``shot`` images of ``pool`` other than the query."""
    others = [p for p in pool if p != query]
    if not others:
        raise ValueError(f"cannot draw supports for query {query!r}: its class has no other image")
    return tuple(others[i] for i in rng.integers(0, len(others), size=shot))


def class_first_episodes(
    rs: np.random.RandomState, classes: Sequence[int], classwise: dict[int, Sequence[str]], shot: int, n: int
) -> list[Episode]:
    """The COCO-20i protocol: per episode a class uniformly, a query of it uniformly, then its supports."""
    eps = []
    for _ in range(n):
        cls = choose(rs, classes)
        query = choose(rs, classwise[cls])
        eps.append(Episode(cls, query, draw_supports(rs, classwise[cls], query, shot)))
    return eps


def class_first_random_episode(
    rng: np.random.Generator, classes: Sequence[int], classwise: dict[int, Sequence[str]], shot: int
) -> Episode:
    """A training episode drawn class first (any generator)."""
    cls = classes[int(rng.integers(len(classes)))]
    pool = classwise[cls]
    query = pool[int(rng.integers(len(pool)))]
    return Episode(cls, query, draw_random_supports(rng, pool, query, shot))


SUPPORT_CONTROLS = ("none", "other_class", "empty_mask")


def control_episodes(
    episodes: Sequence[Episode],
    control: str,
    classwise: dict[int, Sequence[str]],
    classes: Sequence[int],
    shot: int,
    seed: int,
) -> list[Episode]:
    """The evaluation episodes with their supports replaced, to test whether a method uses its support.

    - ``none``: unchanged.
    - ``other_class``: per episode, another class of ``classes`` (uniformly, among those with an image other than
      the query), then ``shot`` supports of it drawn as `draw_supports` does, with their masks of that class. The
      draws come from their own generator, ``RandomState([seed, 1])``, so the query, class and ground truth of every
      episode stay those of the protocol.
    - ``empty_mask``: the episode's own support images with all-background masks.
    """
    if control not in SUPPORT_CONTROLS:
        raise ValueError(f"support_control must be one of {SUPPORT_CONTROLS}, got {control!r}")
    if control == "none":
        return list(episodes)
    if control == "empty_mask":
        return [replace(ep, empty_supports=True) for ep in episodes]
    rs = np.random.RandomState([seed, 1])
    out = []
    for ep in episodes:
        others = [c for c in classes if c != ep.class_id and any(k != ep.query for k in classwise.get(c, ()))]
        if not others:
            raise ValueError(
                f"support_control 'other_class': class {ep.class_id} has no other class with images in this split"
            )
        cls = choose(rs, others)
        out.append(replace(ep, supports=draw_supports(rs, classwise[cls], ep.query, shot), support_class=cls))
    return out
