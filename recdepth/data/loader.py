"""StatefulLoader: micro-batches (inputs, labels) from a TokenStream through a torch DataLoader, exactly resumable.

With W loader workers and in-order loading, batch b comes from worker b mod W, so the position of every
worker follows from the number of consumed batches C: worker w has produced ⌈(C − w)/W⌉ batches. The
state is therefore a small JSON dict around C; restoring regenerates the exact next batch, and batches
that were prefetched but not consumed before a checkpoint are simply produced again.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from recdepth.data.stream import STATE_VERSION, TokenStream, check_state
from recdepth.errors import DataError

IGNORE_INDEX = -100


def collate(rows: np.ndarray, pad_id: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, L] token rows → inputs = row[:-1], labels = row[1:] (int64; pad labels → -100)."""
    x = torch.from_numpy(np.ascontiguousarray(rows).astype(np.int64))
    inputs, labels = x[:, :-1].contiguous(), x[:, 1:].clone()
    if pad_id is not None:
        labels[labels == pad_id] = IGNORE_INDEX
    return inputs, labels


class _Batches(IterableDataset):
    """Per-worker micro-batches; loader worker j plays worker role (j + offset) mod W so order survives resume."""

    def __init__(self, stream: TokenStream, micro_batch: int, pad_id: int | None, starts: list[int], offset: int):
        super().__init__()
        self.stream, self.B, self.pad_id, self.starts, self.offset = stream, micro_batch, pad_id, starts, offset

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        info = get_worker_info()
        j = 0 if info is None else info.id
        w = (j + self.offset) % self.stream.W
        rows = self.stream.worker_rows(w, self.starts[w] * self.B)
        while True:
            batch = []
            for r in rows:
                batch.append(r.tokens)
                if len(batch) == self.B:
                    break
            if len(batch) < self.B:
                return
            yield collate(np.stack(batch), self.pad_id)


class StatefulLoader:
    """Iterable of (inputs [B, S], labels [B, S]) int64 tensors with `state_dict()` / `load_state_dict()`."""

    def __init__(self, stream: TokenStream, micro_batch: int, pad_id: int | None, prefetch_factor: int = 2):
        if stream.batch_rows != micro_batch:
            raise DataError(f"TokenStream.batch_rows={stream.batch_rows} must equal micro_batch={micro_batch}")
        self.stream, self.micro_batch, self.pad_id = stream, micro_batch, pad_id
        self.num_workers = stream.num_workers
        self.prefetch_factor = prefetch_factor
        self.consumed = 0  # micro-batches handed to the caller (C)

    @property
    def fingerprint(self) -> str:
        return self.stream.fingerprint

    def worker_starts(self, consumed: int) -> list[int]:
        """Batches produced so far by each worker role: ⌈(C − w)/W⌉."""
        W = self.stream.W
        return [max(0, -(-(consumed - w) // W)) for w in range(W)]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        W = self.stream.W
        ds = _Batches(self.stream, self.micro_batch, self.pad_id, self.worker_starts(self.consumed), self.consumed % W)
        if self.num_workers == 0:
            it: Iterator = iter(ds)
        else:
            it = iter(DataLoader(ds, batch_size=None, num_workers=self.num_workers, prefetch_factor=self.prefetch_factor,
                                 persistent_workers=False, in_order=True))
        for batch in it:
            self.consumed += 1
            yield batch

    def state_dict(self) -> dict:
        s = self.stream
        return {"version": STATE_VERSION, "fingerprint": s.fingerprint, "consumed_batches": self.consumed,
                "micro_batch": self.micro_batch, "rank": s.rank, "world_size": s.world_size,
                "num_workers": self.num_workers, "seed": s.seed, "segment": s.segment}

    def load_state_dict(self, state: dict) -> None:
        check_state(state, self.fingerprint, self.stream.world_size, self.num_workers, micro_batch=self.micro_batch,
                    rank=self.stream.rank)
        self.stream.set_segment(state.get("segment", 0))
        self.consumed = int(state["consumed_batches"])

    def start_segment(self, segment: int) -> None:
        """Continue with a fresh order of the same data from its start (`data.allow_reshard`): the saved
        position belongs to another world size, worker count, micro batch or dataset and cannot be replayed."""
        self.stream.set_segment(segment)
        self.consumed = 0


def val_batches(stream_sources: list, rank: int, world_size: int, n_batches: int, micro_batch: int,
                pad_id: int | None, verify: bool = True) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The first n_batches·micro_batch rows of this rank's validation partition (rows rank::world of the
    sources' rows in index order, sources interleaved by name); stateless, identical on every call."""
    from recdepth.data.shards import read_shard

    need = n_batches * micro_batch
    per_source = []
    for idx in stream_sources:
        rows: list[np.ndarray] = []
        k = 0  # position in this source's global val order
        for info in idx.shards:
            arr = read_shard(info, idx.row_len, idx.dtype, verify)
            for r in range(len(arr)):
                if k % world_size == rank:
                    rows.append(arr[r])
                k += 1
            if len(rows) >= need:
                break
        if not rows:
            raise DataError(f"{idx.dir}: validation split has {idx.rows} rows, fewer than world_size={world_size}")
        per_source.append(rows)
    mixed = [r for group in zip(*[iter_cycle(rs, need) for rs in per_source]) for r in group][:need]
    return [collate(np.stack(mixed[b * micro_batch:(b + 1) * micro_batch]), pad_id) for b in range(n_batches)]


def iter_cycle(rows: list[np.ndarray], n: int) -> list[np.ndarray]:
    """`n` rows, repeating a too-small validation split deterministically (reported by the caller)."""
    return [rows[i % len(rows)] for i in range(n)]
