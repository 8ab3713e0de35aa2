"""The chunked mean gradient all-reduce (training spec §12) and the Fabric strategy built on it."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

import torch
import torch.distributed as dist
from lightning_fabric.strategies import STRATEGY_REGISTRY, DDPStrategy
from lightning_fabric.strategies.registry import _StrategyRegistry
from lightning_fabric.strategies.strategy import _BackwardSyncControl
from torch import Tensor
from torch.nn import Module

from recdepth.errors import DistributedError

MIB = 2**20
FP32_BYTES = 4


def chunk_numel_for(chunk_mib: float) -> int:
    """Number of fp32 elements in a message of `chunk_mib` MiB (at least one)."""
    return max(1, int(chunk_mib * MIB) // FP32_BYTES)


class ChunkBuffers:
    """Two fp32 message buffers kept across calls, plus whether the cross-rank check already ran.

    Two buffers let the copy-in of the next chunk overlap the collective of the previous one while only one
    collective is ever in flight; keeping them avoids an allocation per chunk and per step.
    """

    def __init__(self) -> None:
        self.buffers: list[Tensor] = []
        self.checked = False
        self.allocations = 0  # how many times the pair was (re)allocated; tests assert it stays at 1

    def get(self, numel: int, device: torch.device) -> list[Tensor]:
        if not self.buffers or self.buffers[0].numel() != numel or self.buffers[0].device != device:
            self.buffers = [torch.empty(numel, dtype=torch.float32, device=device) for _ in range(2)]
            self.allocations += 1
        return self.buffers


def _grads(params: Iterable[Tensor]) -> list[Tensor]:
    """Gradients in parameter order, skipping parameters without one; non-contiguous grads made contiguous."""
    out = []
    for p in params:
        if p.grad is None:
            continue
        if not p.grad.is_contiguous():
            p.grad = p.grad.contiguous()
        out.append(p.grad)
    return out


def _grad_signature(params: list[Tensor]) -> list[int]:
    """(number of grads, total numel, position-weighted checksum of which parameters have grads)."""
    count = total = checksum = 0
    for i, p in enumerate(params):
        if p.grad is None:
            continue
        count += 1
        total += p.grad.numel()
        checksum = (checksum * 1_000_003 + (i + 1) * 65_537 + p.grad.numel()) % (2**61 - 1)
    return [count, total, checksum]


def check_grad_consistency(params: list[Tensor], group: Any = None) -> None:
    """All-gather each rank's gradient signature; raise DistributedError on every rank if they differ.

    A mismatch would shift chunk boundaries between ranks: silently wrong averages or a hang.
    """
    world = dist.get_world_size(group)
    device = next((p.grad.device for p in params if p.grad is not None), torch.device("cpu"))
    if dist.get_backend(group) == "gloo":
        device = torch.device("cpu")
    mine = torch.tensor(_grad_signature(params), dtype=torch.int64, device=device)
    gathered = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(gathered, mine, group=group)
    rows = [tuple(int(v) for v in t.tolist()) for t in gathered]
    if len(set(rows)) > 1:
        detail = "; ".join(f"rank {r}: {c} grads / {n} elements (pattern {s:x})" for r, (c, n, s) in enumerate(rows))
        raise DistributedError(
            "chunked all-reduce: ranks have different gradient sets (number of grads, total elements, "
            f"which parameters): {detail}. Every rank must run the same (n, k) and produce grads for the "
            "same parameters (recurrence.lockstep=true, k >= 1)."
        )


@torch.no_grad()
def chunked_mean_allreduce(
    params: Iterable[Tensor],
    chunk_numel: int,
    group: Any = None,
    buffers: ChunkBuffers | None = None,
) -> int:
    """Average `p.grad` over ranks through constant-size fp32 messages; return the number of collectives.

    Gradients are packed in parameter order into chunks of `chunk_numel` elements (a chunk may span several
    parameters, a parameter several chunks), summed with all_reduce, divided by the world size and copied back
    (up/down-casting as needed). The message size is min(chunk_numel, total gradient numel) for every
    collective, the tail of the last one zero-filled, so all ranks send identical sizes every step. A chunk
    that lies entirely inside one fp32 gradient is reduced in place (a view; same size, no copies).
    """
    params = list(params)
    buffers = buffers if buffers is not None else ChunkBuffers()
    world = dist.get_world_size(group)
    if not buffers.checked:
        check_grad_consistency(params, group)
        buffers.checked = True
    grads = _grads(params)
    if world == 1 or not grads:
        return 0
    total = sum(g.numel() for g in grads)
    size = min(chunk_numel, total)
    bufs = buffers.get(size, grads[0].device)

    cur, fill = 0, 0  # buffer being filled, elements in it
    pending: list[tuple[Tensor, int, int, int]] = []  # (flat grad, grad offset, buffer offset, length)
    inflight: tuple[Any, Tensor, list] | None = None
    collectives = 0

    def copy_back(buf: Tensor, slices: list) -> None:
        if not slices:  # the message was a view of one gradient: average in place
            buf.div_(world)
        for flat, off, at, take in slices:  # mean and downcast in one pass
            torch.div(buf[at : at + take], world, out=flat[off : off + take])

    def flush(message: Tensor, slices: list) -> None:
        # Pipeline with one collective in flight: wait for the previous chunk, start this one, then copy the
        # previous chunk back (and fill its buffer with the next chunk) while this one is being reduced.
        nonlocal inflight, collectives
        previous = inflight
        if previous is not None:
            previous[0].wait()
        work = dist.all_reduce(message, op=dist.ReduceOp.SUM, group=group, async_op=True)
        inflight = (work, message, slices)
        collectives += 1
        if previous is not None:
            copy_back(previous[1], previous[2])

    for g in grads:
        flat = g.view(-1)
        off = 0
        while off < flat.numel():
            if fill == 0 and flat.dtype == torch.float32 and flat.numel() - off >= size:
                # a whole chunk inside one fp32 gradient: reduce that slice itself (same size, no copies)
                flush(flat[off : off + size], [])
                off += size
                continue
            take = min(size - fill, flat.numel() - off)
            bufs[cur][fill : fill + take].copy_(flat[off : off + take])
            pending.append((flat, off, fill, take))
            fill += take
            off += take
            if fill == size:
                flush(bufs[cur], pending)
                cur, fill, pending = 1 - cur, 0, []
    if fill > 0:
        bufs[cur][fill:].zero_()
        flush(bufs[cur], pending)
    if inflight is not None:
        inflight[0].wait()
        copy_back(inflight[1], inflight[2])
    return collectives


def broadcast_module(module: Module, src: int = 0, group: Any = None) -> None:
    """Copy rank `src`'s parameters and buffers to every rank (no reliance on identical init RNG)."""
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(t.data, src=src, group=group)


class _FlagSyncControl(_BackwardSyncControl):
    """`fabric.no_backward_sync` for an unwrapped module: toggles the strategy's sync flag."""

    def __init__(self, strategy: ChunkedDDPStrategy) -> None:
        self._strategy = strategy

    def no_backward_sync(self, module: Module, enabled: bool) -> AbstractContextManager:
        return self._strategy.sync_disabled() if enabled else nullcontext()


class ChunkedDDPStrategy(DDPStrategy):
    """Fabric DDP without the DDP wrapper: after backward, one chunked mean all-reduce of all gradients.

    Synchronisation runs explicitly after `backward` returns (no autograd hooks), once per optimizer step when
    accumulation uses `fabric.no_backward_sync`; the message size stays constant (`chunk_mib`).
    """

    def __init__(self, chunk_mib: float = 64.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not chunk_mib > 0:
            raise DistributedError(f"chunk_mib={chunk_mib!r} is invalid: expected a positive number of MiB")
        self.chunk_mib = float(chunk_mib)
        self.chunk_numel = chunk_numel_for(chunk_mib)
        self.sync_enabled = True
        self.collectives = 0  # total chunked collectives issued (telemetry)
        self._buffers = ChunkBuffers()
        self._modules: list[Module] = []
        self._backward_sync_control = _FlagSyncControl(self)

    @contextmanager
    def sync_disabled(self) -> Iterator[None]:
        previous, self.sync_enabled = self.sync_enabled, False
        try:
            yield
        finally:
            self.sync_enabled = previous

    def setup_module(self, module: Module) -> Module:
        """No wrapper: broadcast rank 0's weights so every replica starts identical, and remember the module."""
        if dist.is_available() and dist.is_initialized():
            broadcast_module(module, src=0)
        self._modules.append(module)
        return module

    def backward(self, tensor: Tensor, module: Module | None, *args: Any, **kwargs: Any) -> None:
        super().backward(tensor, module, *args, **kwargs)
        if self.sync_enabled:
            self.reduce_gradients(module)

    def reduce_gradients(self, module: Module | None = None) -> int:
        """Mean-all-reduce the gradients of `module` (default: every module set up); tied weights once."""
        if not (dist.is_available() and dist.is_initialized()):
            return 0
        modules = [module] if module is not None else self._modules
        seen: set[int] = set()
        params = []
        for m in modules:
            for p in m.parameters():  # parameters() already yields a tied tensor once per module
                if id(p) not in seen:
                    seen.add(id(p))
                    params.append(p)
        n = chunked_mean_allreduce(params, self.chunk_numel, buffers=self._buffers)
        self.collectives += n
        return n

    @classmethod
    def register_strategies(cls, strategy_registry: _StrategyRegistry) -> None:
        if "chunked_ddp" not in strategy_registry:
            strategy_registry.register(
                "chunked_ddp",
                cls,
                description="DDP without wrapper; gradients averaged by a chunked fp32 all-reduce after backward",
                chunk_mib=64.0,
            )


ChunkedDDPStrategy.register_strategies(STRATEGY_REGISTRY)
