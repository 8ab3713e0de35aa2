"""TokenStream: a resumable, rank- and worker-partitioned, weighted mixture of WebDataset token shards.

Addressing is arithmetic (spec/data.md §9): global worker g = rank·W + worker of G = world·W. For source s
and epoch e every rank derives the same shard permutation from (seed, s, e); worker g reads shards
P[g::G] (or, for a source with fewer shards than workers, rows g::G of the epoch's row order), so the
workers of all ranks partition each epoch exactly. The i-th row of worker g comes from the source picked
by inverse-CDF on a uniform from a generator keyed by (seed, g, i // 4096), so any prefix is recomputed
without I/O: restoring "row i of worker g" is replaying choices and seeking, never re-reading rows.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
from torch.utils.data import IterableDataset, get_worker_info

from recdepth.data.shards import ShardIndex, read_shard
from recdepth.errors import DataError

MIX_BLOCK = 4096
CACHE_BYTES = 64 << 20  # decoded rows kept per source and worker
STATE_VERSION = 1


def _rng(seed: int, purpose: str, *unit: int | str) -> np.random.Generator:
    words = [int.from_bytes(hashlib.blake2b(str(u).encode(), digest_size=4).digest(), "little")
             if isinstance(u, str) else int(u) & 0xFFFFFFFF for u in (purpose, *unit)]
    return np.random.default_rng(np.random.SeedSequence(int(seed), spawn_key=tuple(words)))


class Row(NamedTuple):
    tokens: np.ndarray
    source: str
    epoch: int
    shard: int
    row: int


@dataclass
class Source:
    """One mixture component: a split index, its weight and what happens when a worker's epoch runs out."""

    name: str
    index: ShardIndex
    weight: float = 1.0
    exhaustion: str = "next_epoch"  # next_epoch: new shard order | stop: the stream ends


@dataclass
class WeightPhase:
    """From `at` rows consumed by this rank on, mix with `weights` (a piecewise-constant schedule)."""

    at: int
    weights: dict[str, float] = field(default_factory=dict)


class SourceCursor:
    """Rows of one source for global worker g of G, as a pure function of (seed, source, g, position)."""

    def __init__(self, src: Source, g: int, G: int, seed: int, verify: bool):
        self.src, self.g, self.G, self.seed, self.verify = src, g, G, seed, verify
        self.sizes = np.array([s.rows for s in src.index.shards], dtype=np.int64)
        self.n = len(self.sizes)
        self.strided = self.n < G
        if self.strided and int(self.sizes.sum()) < G:
            raise DataError(
                f"source {src.name!r} ({src.index.dir}) has {int(self.sizes.sum())} rows, fewer than the "
                f"{G} loader workers of all ranks; prepare more data or use fewer workers/ranks"
            )
        self._plans: OrderedDict[int, tuple] = OrderedDict()
        self._shards: OrderedDict[int, np.ndarray] = OrderedDict()
        self._orders: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()

    def _row_order(self, e: int, j: int) -> np.ndarray:
        key = (e, j)
        if key not in self._orders:
            self._orders[key] = _rng(self.seed, "row-order", self.src.name, e, j).permutation(int(self.sizes[j]))
            while len(self._orders) > 64:
                self._orders.popitem(last=False)
        return self._orders[key]

    def plan(self, e: int) -> tuple:
        """("shards", my shard ids, cumulative rows) or ("rows", shard of each position, row of each position)."""
        if e not in self._plans:
            perm = _rng(self.seed, "shard-order", self.src.name, e).permutation(self.n)
            if not self.strided:
                mine = perm[self.g :: self.G]
                plan: tuple = ("shards", mine, np.concatenate([[0], np.cumsum(self.sizes[mine])]))
            else:
                shard_of = np.repeat(perm, self.sizes[perm])
                row_of = np.concatenate([self._row_order(e, int(j)) for j in perm])
                plan = ("rows", shard_of[self.g :: self.G], row_of[self.g :: self.G])
            self._plans[e] = plan
            while len(self._plans) > 4:
                self._plans.popitem(last=False)
        return self._plans[e]

    def epoch_len(self, e: int) -> int:
        p = self.plan(e)
        return int(p[2][-1]) if p[0] == "shards" else len(p[1])

    def _shard(self, j: int) -> np.ndarray:
        if j not in self._shards:
            info = self.src.index.shards[j]
            self._shards[j] = read_shard(info, self.src.index.row_len, self.src.index.dtype, self.verify)
            # keep recently read shards up to CACHE_BYTES (at least the current one; all of a strided source)
            while (not self.strided and len(self._shards) > 1
                   and sum(a.nbytes for a in self._shards.values()) > CACHE_BYTES):
                self._shards.popitem(last=False)
        return self._shards[j]

    def iter_from(self, q: int) -> Iterator[Row]:
        """Rows from position q on (epochs roll over with a fresh shard order)."""
        e = 0
        while q >= (n := self.epoch_len(e)):
            q -= n
            e += 1
        while True:
            p = self.plan(e)
            if p[0] == "shards":
                _, mine, cum = p
                k = int(np.searchsorted(cum, q, side="right")) - 1
                while k < len(mine):
                    j = int(mine[k])
                    rows, order = self._shard(j), self._row_order(e, j)
                    for o in range(q - int(cum[k]), int(self.sizes[j])):
                        r = int(order[o])
                        yield Row(rows[r], self.src.name, e, j, r)
                    q = int(cum[k + 1])
                    k += 1
            else:
                _, shard_of, row_of = p
                for o in range(q, len(shard_of)):
                    j, r = int(shard_of[o]), int(row_of[o])
                    yield Row(self._shard(j)[r], self.src.name, e, j, r)
            e, q = e + 1, 0


class TokenStream(IterableDataset):
    """block_size+1 token rows for one rank: partitioned over ranks and workers, mixed, exactly resumable."""

    def __init__(
        self,
        sources: list[Source],
        *,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        seed: int = 0,
        batch_rows: int = 1,
        schedule: list[WeightPhase] | None = None,
        verify: bool = True,
    ):
        super().__init__()
        later = {n for ph in schedule or [] for n, w in ph.weights.items() if w > 0}
        sources = [s for s in sources if s.weight > 0 or s.name in later]
        if not sources:
            raise DataError("no data source with a positive weight")
        if not 0 <= rank < world_size:
            raise DataError(f"rank={rank} is outside world_size={world_size}")
        lens = {s.index.row_len for s in sources}
        if len(lens) != 1:
            raise DataError(f"sources have different row lengths {sorted(lens)}: prepare them with one block_size")
        self.sources = sorted(sources, key=lambda s: s.name)
        self.names = [s.name for s in self.sources]
        self.rank, self.world_size, self.num_workers = rank, world_size, num_workers
        self.W = max(num_workers, 1)
        self.G = world_size * self.W
        self.seed, self.batch_rows, self.verify = int(seed), int(batch_rows), verify
        self.row_len = lens.pop()
        phases = [WeightPhase(0, {s.name: s.weight for s in self.sources})] + sorted(schedule or [],
                                                                                   key=lambda p: p.at)
        for ph in phases[1:]:
            unknown = sorted(set(ph.weights) - set(self.names))
            if unknown:
                raise DataError(f"weight schedule at {ph.at} names unknown source(s) {unknown}; have {self.names}")
        self._starts = np.array([p.at for p in phases], dtype=np.int64)
        base = {s.name: s.weight for s in self.sources}
        cdfs = []
        for ph in phases:
            merged = {**base, **ph.weights}  # a phase overrides only the sources it names
            w = np.array([float(merged[n]) for n in self.names])
            if (w < 0).any() or w.sum() <= 0:
                raise DataError(f"weights at row {ph.at} must be >= 0 with a positive sum: {merged}")
            c = np.cumsum(w / w.sum())
            c[-1] = 1.0
            cdfs.append(c)
        self._cdfs = np.stack(cdfs)
        self._stop = [i for i, s in enumerate(self.sources) if s.exhaustion == "stop"]
        self.set_segment(0)

    # ------------------------------------------------------------------------------------------ identity

    @property
    def fingerprint(self) -> str:
        ident = {"sources": {s.name: [s.index.fingerprint, s.weight, s.exhaustion] for s in self.sources},
                 "schedule": [self._starts.tolist(), self._cdfs.round(12).tolist()], "seed": self.seed}
        return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]

    def set_segment(self, segment: int) -> None:
        """Segment 0 draws every order from the configured seed; segment s > 0 (a resume with
        `data.allow_reshard` onto another layout) from a seed derived from (seed, s): a fresh, equally valid
        order of the same data, starting at position 0 of every worker."""
        self.segment = int(segment)
        self._key = self.seed if self.segment == 0 else int(_rng(self.seed, "segment", self.segment).integers(2**62))
        self._length: int | None = None
        self._start = [0] * self.W
        self._pos = [0] * self.W

    def global_worker(self, worker: int) -> int:
        return self.rank * self.W + worker

    # ------------------------------------------------------------------------------------------- mixture

    def choices(self, g: int, block: int) -> np.ndarray:
        """Source index of rows [block·4096, (block+1)·4096) of global worker g."""
        if len(self.sources) == 1:
            return np.zeros(MIX_BLOCK, dtype=np.int64)
        u = _rng(self._key, "mix", g, block).random(MIX_BLOCK)
        if len(self._starts) == 1:
            return np.searchsorted(self._cdfs[0], u, side="right").clip(max=len(self.sources) - 1)
        w = g % self.W
        i = block * MIX_BLOCK + np.arange(MIX_BLOCK)
        B = self.batch_rows
        rank_row = ((i // B) * self.W + w) * B + i % B  # rows this rank consumed before row i of this worker
        phase = np.searchsorted(self._starts, rank_row, side="right") - 1
        return (u[:, None] >= self._cdfs[phase]).sum(axis=1).clip(max=len(self.sources) - 1)

    def _positions(self, g: int, start: int) -> np.ndarray:
        """q_s: how many rows each source gave worker g before its row `start` (choices replayed, no reads)."""
        q = np.zeros(len(self.sources), dtype=np.int64)
        full, rest = divmod(start, MIX_BLOCK)
        for b in range(full):
            q += np.bincount(self.choices(g, b), minlength=len(self.sources))
        if rest:
            q += np.bincount(self.choices(g, full)[:rest], minlength=len(self.sources))
        return q

    def length(self) -> int | None:
        """Rows per worker when a `stop` source is present (equal for all workers of all ranks), else None."""
        if not self._stop:
            return None
        if self._length is None:
            lens = []
            for g in range(self.G):
                limits = {i: SourceCursor(self.sources[i], g, self.G, self._key, False).epoch_len(0) for i in self._stop}
                counts = np.zeros(len(self.sources), dtype=np.int64)
                b, found = 0, None
                while found is None:
                    c = self.choices(g, b)
                    for i, lim in limits.items():
                        hits = np.flatnonzero(c == i)
                        if counts[i] + len(hits) > lim:
                            pos = b * MIX_BLOCK + int(hits[lim - counts[i]])
                            found = pos if found is None else min(found, pos)
                    counts += np.bincount(c, minlength=len(self.sources))
                    b += 1
                lens.append(found)
            self._length = min(lens) // self.batch_rows * self.batch_rows
        return self._length

    # ----------------------------------------------------------------------------------------- iteration

    def worker_rows(self, worker: int, start: int = 0) -> Iterator[Row]:
        """Rows of loader worker `worker` of this rank from its row `start` on (a pure function of both)."""
        if not 0 <= worker < self.W:
            raise DataError(f"worker={worker} is outside num_workers={self.num_workers}")
        g = self.global_worker(worker)
        limit = self.length()
        q = self._positions(g, start)
        cursors = [SourceCursor(s, g, self.G, self._key, self.verify).iter_from(int(q[k]))
                   for k, s in enumerate(self.sources)]
        i = start
        block, offset = divmod(start, MIX_BLOCK)
        while True:
            picks = self.choices(g, block)
            for k in picks[offset:]:
                if limit is not None and i >= limit:
                    return
                yield next(cursors[int(k)])
                i += 1
            block, offset = block + 1, 0

    def _worker_id(self) -> int:
        info = get_worker_info()
        if info is None:
            return 0
        if info.num_workers != self.W:
            raise DataError(f"TokenStream built for num_workers={self.num_workers} runs in {info.num_workers} workers")
        return info.id

    def __iter__(self) -> Iterator[np.ndarray]:
        w = self._worker_id()
        self._pos[w] = self._start[w]
        for row in self.worker_rows(w, self._start[w]):
            self._pos[w] += 1
            yield row.tokens

    # ------------------------------------------------------------------------------------------- state

    def state_dict(self) -> dict:
        """Rows yielded per worker (exact when iterated in this process; loaders keep their own count)."""
        return {"version": STATE_VERSION, "fingerprint": self.fingerprint, "rank": self.rank,
                "world_size": self.world_size, "num_workers": self.num_workers, "segment": self.segment,
                "positions": list(self._pos)}

    def load_state_dict(self, state: dict) -> None:
        check_state(state, self.fingerprint, self.world_size, self.num_workers)
        self.set_segment(state.get("segment", 0))
        self._start = [int(x) for x in state["positions"]]
        self._pos = list(self._start)


def check_state(state: dict, fingerprint: str, world_size: int, num_workers: int, **more: int) -> None:
    """A saved position only means something for the same data, world size and worker count."""
    if state.get("version") != STATE_VERSION:
        raise DataError(f"data state version {state.get('version')!r}; expected {STATE_VERSION}")
    if state.get("fingerprint") != fingerprint:
        raise DataError(f"data state is for dataset {state.get('fingerprint')!r}, this run reads {fingerprint!r}; "
                        "resume with the same data config (sources, weights, seed), or set data.allow_reshard=true "
                        "to continue with a fresh data order")
    for k, v in {"world_size": world_size, "num_workers": num_workers, **more}.items():
        if state.get(k) != v:
            raise DataError(f"data state was saved with {k}={state.get(k)}, this run has {k}={v}; exact resume "
                            f"needs the same {k} (data.allow_reshard=true continues with a fresh data order instead)")
