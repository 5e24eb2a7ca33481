"""Batched lockstep search: the beams of many requests advanced together, one scorer call per step.

NANN's search (paper IV-B; ``service.search``) scores a few hundred pairs per expansion step. On a GPU
a call that small leaves the device idle; the request-merging ``BatchingScorer`` fills it with whatever
other requests happen to be waiting, through a queue and a batcher thread. Lockstep does it by design:
the caller hands over B requests, every request takes its next step (``RequestBeam.advance``), and the
rows all of them need are scored in ONE call (``ScoreMany``), frontiers concatenated with per-request
offsets. Requests keep their own parameters (ef, T, top-n, degree caps, seeds, filtered beam, filters,
deadline): a request whose layer is done waits for the others at the layer boundary, one past its
deadline stops there with its best so far. The per-request state machine is the one ``search`` uses,
so each request gets the rows and scores it gets alone whenever the scorer gives each pair the same
score in a batch of many requests as in its own (exact for a per-request scorer; a merged model call
may differ in the last float bit, see ``MatchEngine.match_many``).

Memory: one ``VisitedSet`` per request in flight (12 bytes per catalogue entity: 12 MB at 1M).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from service.search import RequestBeam, SearchOutcome

# (request indices, their rows to score, one array each) -> their scores, in ONE model call where the
# scorer can; every rows array is non-empty.
ScoreMany = Callable[[list[int], list[np.ndarray]], list[np.ndarray]]

_NO_SCORES = np.empty(0, dtype=np.float32)


def search_many(beams: Sequence[RequestBeam], score_many: ScoreMany) -> list[SearchOutcome]:
    """Run every beam to its outcome, one ``score_many`` call per lockstep step (at most one per layer
    entry and expansion step, none when no request needs a new score)."""
    active = [i for i, b in enumerate(beams) if b.next_layer()]
    while active:
        pending = {i: beams[i].start_layer() for i in active}
        while pending:
            need = [i for i, rows in pending.items() if rows.size]
            got = dict(zip(need, score_many(need, [pending[i] for i in need]), strict=True)) if need else {}
            nxt = {}
            for i in pending:
                rows = beams[i].advance(got.get(i, _NO_SCORES))
                if rows is not None:
                    nxt[i] = rows
            pending = nxt
        for i in active:
            beams[i].end_layer()
        active = [i for i in active if beams[i].next_layer()]
    return [b.outcome() for b in beams]
