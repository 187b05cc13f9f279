"""DGS: top-k gradient sparsification with SAMomentum as a DDP communication hook.

Synchronous version of "dual-way gradient sparsification" (DGS) with *sparsification-aware momentum*
(SAMomentum), written against PyTorch's ``DistributedDataParallel.register_comm_hook`` API the same way
``torch.distributed.algorithms.ddp_comm_hooks.powerSGD_hook`` is.

Algorithm (per rank ``r``, per parameter tensor, every optimizer step once ``step >= start_step``)::

    u_r  <- m * u_r + (g_r + lambda * theta)        # momentum kept in the hook, gradient units
    M_r  <- top-ceil(rho * n) coordinates of |u_r|   # per parameter ("per layer top-rho" of the paper)
    send (values u_r[M_r], int32 indices of M_r)     # all_gather, the same k on every rank
    u_r  <- u_r on sent coordinates                  # "sent coordinates keep their velocity"
            u_r / m on unsent coordinates            # "unsent ones become u/m"
    Delta <- (1/W) * sum_r  scatter(u_r[M_r])        # replicated on every rank
    return Delta                                     # DDP writes it into .grad

and the optimizer after the hook does a plain step ``theta <- theta - lr * Delta`` (``torch.optim.SGD`` with
``momentum=0, weight_decay=0``).

Why ``u/m``: a coordinate that is held back for ``tau`` steps after being sent with velocity ``u0`` is, at the
step it is sent again, ``m * u0 + (g_1 + ... + g_tau)``: one momentum step on the *sum* of the gradients it
missed, i.e. an adaptive per-coordinate batch size (dividing by ``m`` exactly cancels the ``m *`` of the next
step, so the held-back part accumulates without decay while the last sent velocity decays once).
Implementation detail: instead of storing ``u/m`` and multiplying by ``m`` on the next step, the hook stores the
*carry* ``c = m*u`` on sent and ``c = u`` on unsent coordinates and computes ``u <- c + g + lambda*theta``; this is
the same recurrence without the division (so ``m = 0`` is allowed too: it degenerates to top-k sparsification
with error feedback). The unit test compares against the literal ``u/m`` formulation.

Learning rate: the hook works in *gradient units* (``eta`` is not inside the velocity). With a constant learning
rate ``eta`` this is exactly the paper's ``u <- m*u + eta*(g + lambda*theta)`` (scale ``u`` by ``eta``); with a
schedule it is PyTorch's SGD convention (the lr of the step at which a coordinate is applied multiplies it), so
the training script's LR scheduler keeps working unchanged. With ``density=1.0`` the hook therefore reproduces
``torch.optim.SGD(lr, momentum=m, weight_decay=lambda)`` on all-reduce-averaged gradients.

Warm-up (``step < start_step``): dense ``all_reduce`` of the gradient (as DDP does without a hook), followed by the
same momentum recurrence on the averaged gradient (so the first steps are plain all-reduce SGD with momentum
and every rank holds the same velocity when sparsification starts). DDP rebuilds its buckets after the first
iteration; PowerSGD keys its state by ``bucket.index()`` and therefore must stay dense until then. Here the
velocity is keyed by *parameter name* (``bucket.index()`` only keys a cache of each bucket's layout, checked on
every call), so bucket rebuilds and checkpoint restores cannot misplace it; ``start_step`` is a pure algorithmic
choice (default 10, like PowerSGD's ``start_powerSGD_iter``).

Download side (optional, off by default): the paper's server sends each worker only the top-rho of the model
difference it has not yet received and keeps the rest for later. In synchronous DDP every rank already holds the
same aggregated update ``Delta``, so the not-yet-received remainder is *replicated*: with ``download_density``
set, each rank applies ``top-rho_d(Delta + R)`` (per parameter) and keeps ``R <- (Delta + R) - applied``; every
``download_resync_every`` sparse steps the whole ``Delta + R`` is applied (the paper's dense resync). Replicas stay
identical (no extra communication, no divergence). NOTE: with this all-gather transport it saves *no* bytes (each
rank has already received all ``W*k`` entries); it reproduces the paper's download sparsification (a bounded
number of coordinates changes per step, the lagging-replica effect) and is where a parameter-server or
hierarchical transport would save downlink bandwidth. It costs one more fp32 copy of the parameters.

Communication: each rank contributes ``k`` int32 indices + ``k`` fp32 values per bucket (``8 k`` bytes) to one
``all_gather`` instead of ``4 n`` (fp32 buckets) or ``2 n`` (bf16 buckets) bytes to an ``all_reduce``. The payload
ratio is ``1/(2 rho)`` for fp32 buckets (50x at 1%). On the wire (ring algorithms) an all-gather moves
``(W-1) * 8k`` bytes per rank while an all-reduce moves ``2 (W-1)/W * 4n``, so the wire ratio is ``1/(W rho)``:
the all-gather grows with the world size and stops paying off around ``W ~ 1/rho``. Both are counted
(``DGSState.compression_stats()``).

Checkpointing: ``DGSState.state_dict()`` is a collective (every rank must call it); it gathers every rank's
velocity to rank 0 (the process that writes the file) and ``load_state_dict`` picks this rank's part, so resuming
is exact. The world size must be the same when resuming. ``save_state_files`` / ``load_state_files`` store it as
safetensors (tensors) + JSON (everything else): no pickle, so a planted checkpoint cannot run code (accelerate's
``register_for_checkpointing`` would write a pickle and read it back with ``weights_only=False``).
"""

import json
import os
import warnings
from fractions import Fraction
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["DGSState", "dgs_hook", "load_state_files", "register_dgs", "save_state_files", "topk_count"]

_INDEX_BYTES = 4  # int32 indices
_VALUE_DTYPE = torch.float32  # values are sent (and the velocity is kept) in fp32
_VALUE_BYTES = 4


def topk_count(numel: int, density: float, min_k: int = 1) -> int:
    """Number of coordinates kept for a tensor of ``numel`` elements: ``min(numel, max(min_k, ceil(density*numel)))``.

    ``density`` is read as the decimal it was written as (``0.01`` is exactly 1/100), so ``ceil`` does not round
    up on floating-point noise.
    """
    frac = Fraction(density).limit_denominator(10**9)
    k = -((-frac.numerator * numel) // frac.denominator)  # exact ceil
    return int(min(numel, max(min_k, k)))


class _BucketLayout:
    """Cached view of one DDP bucket: parameter names, offsets into the flat buffer, and k per parameter."""

    __slots__ = ("signature", "names", "params", "offsets", "numels", "ks", "kds", "numel", "k_total")

    def __init__(self, signature, names, params, offsets, numels, ks, kds, numel):
        self.signature = signature
        self.names = names
        self.params = params
        self.offsets = offsets
        self.numels = numels
        self.ks = ks
        self.kds = kds
        self.numel = numel
        self.k_total = sum(ks)


class DGSState:
    """State of the DGS communication hook (one per rank).

    Args:
        process_group: group to communicate in (``None``: the default group).
        density: fraction ``rho`` of each parameter's coordinates sent per step (0 < rho <= 1).
        start_step: number of optimizer steps done with dense all-reduce (plus momentum) before sparsifying.
        momentum: SAMomentum coefficient ``m`` (0 <= m < 1).
        weight_decay: ``lambda``; the hook adds ``lambda * theta`` to the gradient before the momentum (use it
            instead of the optimizer's weight decay).
        download_density: ``rho_d`` of the replicated download residual (``None``: off, the full aggregated update
            is applied).
        download_resync_every: with a download residual, apply everything every this many sparse steps (0: never).
        min_k: at least this many coordinates per parameter.
        named_parameters: iterable of ``(name, parameter)`` (``register_dgs`` passes the DDP module's); names key the
            velocity so that it survives bucket rebuilds and checkpoints.

    Attributes that count this rank's traffic (bytes it contributes to collectives, cumulative):
        ``bytes_sent`` / ``bytes_dense_equivalent`` (all steps), ``sparse_bytes_sent`` /
        ``sparse_bytes_dense_equivalent`` (sparse steps only), ``wire_bytes_sent`` / ``wire_bytes_dense_equivalent``
        (ring-algorithm estimates of what leaves the rank). ``iter`` counts the optimizer steps seen by the hook.
    """

    def __init__(
        self,
        process_group: dist.ProcessGroup | None = None,
        density: float = 0.01,
        start_step: int = 10,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        download_density: float | None = None,
        download_resync_every: int = 0,
        min_k: int = 1,
        named_parameters=None,
    ):
        if not 0.0 < density <= 1.0:
            raise ValueError(f"density must be in (0, 1], got {density}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        if start_step < 0:
            raise ValueError(f"start_step must be >= 0, got {start_step}")
        if download_density is not None and not 0.0 < download_density <= 1.0:
            raise ValueError(f"download_density must be in (0, 1] or None, got {download_density}")
        if download_resync_every < 0:
            raise ValueError("download_resync_every must be >= 0")
        if min_k < 1:
            raise ValueError("min_k must be >= 1")
        self.process_group = process_group
        self.density = float(density)
        self.start_step = int(start_step)
        self.momentum = float(momentum)
        self.weight_decay = float(weight_decay)
        self.download_density = None if download_density is None else float(download_density)
        self.download_resync_every = int(download_resync_every)
        self.min_k = int(min_k)
        self.iter = 0
        self._names: dict[int, str] = {}
        if named_parameters is not None:
            self.set_parameter_names(named_parameters)
        # per-parameter fp32 carry (see module docstring) and replicated download residual, flat, by name
        self._carry: dict[str, torch.Tensor] = {}
        self._residual: dict[str, torch.Tensor] = {}
        self._layouts: dict[int, _BucketLayout] = {}
        self._reset_counters()

    # ----------------------------------------------------------------------------------------------- setup
    def set_parameter_names(self, named_parameters) -> None:
        """Tell the state which name each parameter has (keys of the velocity and of the checkpoint)."""
        self._names = {id(p): n for n, p in named_parameters}
        self._layouts = {}

    def _reset_counters(self) -> None:
        self.dense_steps = 0
        self.sparse_steps = 0
        self.bytes_sent = 0
        self.bytes_dense_equivalent = 0
        self.sparse_bytes_sent = 0
        self.sparse_bytes_dense_equivalent = 0
        self.wire_bytes_sent = 0.0
        self.wire_bytes_dense_equivalent = 0.0

    def _group(self):
        return self.process_group if self.process_group is not None else dist.group.WORLD

    def _layout(self, bucket: dist.GradBucket) -> _BucketLayout:
        params = bucket.parameters()
        buf = bucket.buffer()
        signature = (buf.numel(), tuple(id(p) for p in params))
        lay = self._layouts.get(bucket.index())
        if lay is not None and lay.signature == signature:
            return lay
        names, offsets, numels, ks, kds = [], [], [], [], []
        esize = buf.element_size()
        for p, g in zip(params, bucket.gradients()):
            name = self._names.get(id(p))
            if name is None:
                raise RuntimeError(
                    "DGS hook: a bucket parameter has no name; create the state with register_dgs(ddp_model, ...) "
                    "or call state.set_parameter_names(ddp_model.module.named_parameters())"
                )
            if not g.is_contiguous():
                raise NotImplementedError(f"DGS hook: non-contiguous gradient bucket view for {name}")
            off = (g.data_ptr() - buf.data_ptr()) // esize
            n = g.numel()
            names.append(name)
            offsets.append(int(off))
            numels.append(n)
            ks.append(topk_count(n, self.density, self.min_k))
            kds.append(topk_count(n, self.download_density, self.min_k) if self.download_density else n)
        if buf.numel() >= 2**31:
            raise NotImplementedError("DGS hook: bucket with >= 2**31 elements (int32 indices)")
        lay = _BucketLayout(signature, names, list(params), offsets, numels, ks, kds, buf.numel())
        self._layouts[bucket.index()] = lay
        return lay

    def _ensure_buffers(self, lay: _BucketLayout, device: torch.device) -> None:
        # Runs in the hook body (the autograd thread), never in a future callback, so dict insertions never race.
        for name, n in zip(lay.names, lay.numels):
            for store, wanted in ((self._carry, True), (self._residual, self.download_density is not None)):
                if not wanted:
                    continue
                t = store.get(name)
                if t is None:
                    store[name] = torch.zeros(n, dtype=_VALUE_DTYPE, device=device)
                elif t.device != device or t.dtype != _VALUE_DTYPE:
                    store[name] = t.to(device=device, dtype=_VALUE_DTYPE)
                if store[name].numel() != n:
                    raise RuntimeError(f"DGS state for {name} has {store[name].numel()} elements, parameter has {n}")

    def _velocity_input(self, lay: _BucketLayout, grad_flat: torch.Tensor) -> torch.Tensor:
        """u = carry + g (+ lambda*theta), fp32, flat in bucket layout (a new tensor)."""
        u = grad_flat.to(_VALUE_DTYPE, copy=True)
        for name, p, off, n in zip(lay.names, lay.params, lay.offsets, lay.numels):
            seg = u[off : off + n]
            seg.add_(self._carry[name])
            if self.weight_decay:
                seg.add_(p.detach().reshape(-1).to(_VALUE_DTYPE), alpha=self.weight_decay)
        return u

    # --------------------------------------------------------------------------------------------- stats
    def compression_stats(self) -> dict[str, float]:
        """Traffic of this rank. ``compression_ratio``: dense all-reduce payload / sparse payload over the sparse
        steps; ``wire_compression_ratio``: the same for ring-algorithm bytes on the wire (all steps)."""
        return {
            "dense_steps": self.dense_steps,
            "sparse_steps": self.sparse_steps,
            "bytes_sent": self.bytes_sent,
            "bytes_dense_equivalent": self.bytes_dense_equivalent,
            "sparse_bytes_sent": self.sparse_bytes_sent,
            "sparse_bytes_dense_equivalent": self.sparse_bytes_dense_equivalent,
            "compression_ratio": (
                self.sparse_bytes_dense_equivalent / self.sparse_bytes_sent if self.sparse_bytes_sent else float("nan")
            ),
            "overall_compression_ratio": (
                self.bytes_dense_equivalent / self.bytes_sent if self.bytes_sent else float("nan")
            ),
            "wire_bytes_sent": self.wire_bytes_sent,
            "wire_bytes_dense_equivalent": self.wire_bytes_dense_equivalent,
            "wire_compression_ratio": (
                self.wire_bytes_dense_equivalent / self.wire_bytes_sent if self.wire_bytes_sent else float("nan")
            ),
        }

    # ----------------------------------------------------------------------------------------- checkpoint
    _COUNTERS = (
        "dense_steps",
        "sparse_steps",
        "bytes_sent",
        "bytes_dense_equivalent",
        "sparse_bytes_sent",
        "sparse_bytes_dense_equivalent",
        "wire_bytes_sent",
        "wire_bytes_dense_equivalent",
    )
    _HYPER = ("density", "start_step", "momentum", "weight_decay", "download_density", "download_resync_every", "min_k")

    def state_dict(self) -> dict[str, Any]:
        """Exact hook state. COLLECTIVE when torch.distributed is initialised: every rank of the group must call it.

        The velocity differs per rank; it is gathered to group rank 0 (the process ``accelerate`` writes the file
        from) as ``per_rank[r][name]`` (CPU fp32). Other ranks get ``per_rank=None``. The download residual is
        replicated, rank 0's copy is stored.
        """
        names = sorted(self._carry)
        per_rank: list[dict[str, torch.Tensor]] | None
        if dist.is_available() and dist.is_initialized() and dist.get_world_size(self._group()) > 1:
            group = self._group()
            world = dist.get_world_size(group)
            rank = dist.get_rank(group)
            dst = dist.get_global_rank(group, 0)
            comm_device = torch.device("cpu")
            if dist.get_backend(group) == "nccl":
                comm_device = torch.device("cuda", torch.cuda.current_device())
            # every rank must hold the same names (all buckets go through the hook on every rank)
            count = torch.tensor([len(names), sum(self._carry[n].numel() for n in names)], device=comm_device)
            counts = [torch.zeros_like(count) for _ in range(world)]
            dist.all_gather(counts, count, group=group)
            if any(not torch.equal(c, count) for c in counts):
                raise RuntimeError("DGS state_dict: ranks hold different sets of velocity tensors")
            per_rank = [{} for _ in range(world)] if rank == 0 else None
            for name in names:
                t = self._carry[name].detach().to(device=comm_device, dtype=_VALUE_DTYPE).contiguous()
                gather_list = [torch.empty_like(t) for _ in range(world)] if rank == 0 else None
                dist.gather(t, gather_list, dst=dst, group=group)
                if rank == 0:
                    for r in range(world):
                        per_rank[r][name] = gather_list[r].cpu()
            world_size = world
        else:
            per_rank = [{n: self._carry[n].detach().cpu().clone() for n in names}]
            world_size = 1
        return {
            "format": "upcycled_moe.dgs/1",
            "iter": self.iter,
            "world_size": world_size,
            "hyperparameters": {h: getattr(self, h) for h in self._HYPER},
            "counters": {c: getattr(self, c) for c in self._COUNTERS},
            "per_rank": per_rank,
            "residual": {n: t.detach().cpu().clone() for n, t in sorted(self._residual.items())},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a ``state_dict()`` (on every rank; each rank takes its own velocity). Hyperparameters are those
        of this object (a warning is given if the checkpoint was written with different ones)."""
        if state.get("format") != "upcycled_moe.dgs/1":
            raise ValueError("not a DGS state dict")
        per_rank = state["per_rank"]
        if per_rank is None:
            raise ValueError("this DGS state dict was produced on a non-zero rank and holds no velocity")
        world, rank = 1, 0
        if dist.is_available() and dist.is_initialized():
            world, rank = dist.get_world_size(self._group()), dist.get_rank(self._group())
        if len(per_rank) != world:
            raise ValueError(
                f"DGS checkpoint was written with {len(per_rank)} ranks, this run has {world}; the per-rank "
                "velocities cannot be mapped (start a fresh DGSState instead)"
            )
        changed = [h for h in self._HYPER if state["hyperparameters"].get(h) != getattr(self, h)]
        if changed:
            warnings.warn(f"DGS state restored with different hyperparameters: {changed}; resume is not exact")
        self._carry = {n: t.detach().to(_VALUE_DTYPE).clone() for n, t in per_rank[rank].items()}
        self._residual = {n: t.detach().to(_VALUE_DTYPE).clone() for n, t in state["residual"].items()}
        self.iter = int(state["iter"])
        for c in self._COUNTERS:
            setattr(self, c, state["counters"][c])
        self._layouts = {}


def _all_gather_into(out: torch.Tensor, inp: torch.Tensor, group) -> torch.futures.Future:
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    return fn(out, inp, group=group, async_op=True).get_future()


def dgs_hook(state: DGSState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP communication hook: SAMomentum + per-parameter top-k sparse exchange (see the module docstring).

    Returns a future holding the averaged sparse update (gradient units) for the bucket; use it with a plain
    optimizer step (``torch.optim.SGD(params, lr, momentum=0, weight_decay=0)``).

    Example::
        >>> state = DGSState(density=0.01, start_step=10, momentum=0.9,
        ...                  named_parameters=ddp_model.module.named_parameters())
        >>> ddp_model.register_comm_hook(state, dgs_hook)
    """
    group = state._group()
    world = dist.get_world_size(group)
    buf = bucket.buffer()
    lay = state._layout(bucket)
    step = state.iter
    sparse = step >= state.start_step
    if bucket.is_last():  # bucket.is_last() is the last bucket reduced in an iteration (as in PowerSGD)
        state.iter += 1
        if sparse:
            state.sparse_steps += 1
        else:
            state.dense_steps += 1
    state._ensure_buffers(lay, buf.device)
    m = state.momentum
    n_total = lay.numel
    dense_bytes = n_total * buf.element_size()
    state.bytes_dense_equivalent += dense_bytes
    state.wire_bytes_dense_equivalent += 2.0 * (world - 1) / world * dense_bytes

    if not sparse:
        state.bytes_sent += dense_bytes
        state.wire_bytes_sent += 2.0 * (world - 1) / world * dense_bytes
        buf.div_(world)  # divide first (as DDP's default hook) to avoid overflow in low precision
        fut = dist.all_reduce(buf, group=group, async_op=True).get_future()

        def finish_dense(fut: torch.futures.Future) -> torch.Tensor:
            avg = fut.value()[0]
            u = state._velocity_input(lay, avg)
            for name, off, n in zip(lay.names, lay.offsets, lay.numels):
                state._carry[name].copy_(u[off : off + n]).mul_(m)  # everything was "sent"
            buf.copy_(u)
            return buf

        return fut.then(finish_dense)

    # ---- sparse step: momentum, per-parameter top-k, SAMomentum carry (all local, in the hook body)
    u = state._velocity_input(lay, buf)
    idx_parts = []
    for off, n, k in zip(lay.offsets, lay.numels, lay.ks):
        seg = u[off : off + n]
        if k >= n:
            idx_parts.append(torch.arange(off, off + n, device=u.device))
        else:
            idx_parts.append(torch.topk(seg.abs(), k, sorted=False).indices + off)
    idx = torch.cat(idx_parts)
    vals = u.index_select(0, idx)
    # carry: unsent coordinates keep u (= m * (u/m)), sent coordinates m*u (their velocity decays once)
    u.index_copy_(0, idx, vals * m)
    for name, off, n in zip(lay.names, lay.offsets, lay.numels):
        state._carry[name].copy_(u[off : off + n])
    k_total = idx.numel()
    payload = torch.cat([idx.to(torch.int32).view(torch.uint8), vals.view(torch.uint8)])
    out = torch.empty(world * payload.numel(), dtype=torch.uint8, device=payload.device)
    sent = payload.numel()
    state.bytes_sent += sent
    state.sparse_bytes_sent += sent
    state.sparse_bytes_dense_equivalent += dense_bytes
    state.wire_bytes_sent += float((world - 1) * sent)
    resync = (
        state.download_density is not None
        and state.download_resync_every > 0
        and (step - state.start_step + 1) % state.download_resync_every == 0
    )
    fut = _all_gather_into(out, payload, group)

    def finish_sparse(fut: torch.futures.Future) -> torch.Tensor:
        rows = out.view(world, -1)
        delta = torch.zeros(n_total, dtype=_VALUE_DTYPE, device=buf.device)
        for r in range(world):  # fixed rank order: bitwise identical on every rank
            r_idx = rows[r, : _INDEX_BYTES * k_total].view(torch.int32).long()
            r_val = rows[r, _INDEX_BYTES * k_total :].view(_VALUE_DTYPE)
            delta.index_add_(0, r_idx, r_val)  # indices are unique within a rank
        delta.div_(world)
        if state.download_density is not None:
            for name, off, n, kd in zip(lay.names, lay.offsets, lay.numels, lay.kds):
                d = delta[off : off + n]
                res = state._residual[name]
                d.add_(res)
                if resync or kd >= n:
                    res.zero_()
                else:
                    keep = torch.topk(d.abs(), kd, sorted=False).indices
                    res.copy_(d)
                    res.index_fill_(0, keep, 0.0)
                    d.sub_(res)  # exactly zero where not kept, unchanged where kept
        buf.copy_(delta)
        return buf

    return fut.then(finish_sparse)


def register_dgs(
    ddp_model: torch.nn.parallel.DistributedDataParallel,
    density: float = 0.01,
    start_step: int = 10,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    download_density: float | None = None,
    download_resync_every: int = 0,
    min_k: int = 1,
    process_group: dist.ProcessGroup | None = None,
) -> DGSState:
    """Register the DGS hook on a DDP model (e.g. the one ``accelerator.prepare`` returns when
    ``num_processes > 1``) and return its state (checkpoint it with ``save_state_files(state.state_dict(), folder)``
    and restore it with ``state.load_state_dict(load_state_files(folder))``: no pickle involved).

    Use a plain optimizer step afterwards: ``torch.optim.SGD(params, lr=eta, momentum=0, weight_decay=0)``; the
    momentum ``m`` and weight decay ``lambda`` live in the hook. Must be called before the first backward pass.
    """
    if not isinstance(ddp_model, torch.nn.parallel.DistributedDataParallel):
        raise TypeError(f"register_dgs needs a DistributedDataParallel model, got {type(ddp_model).__name__}")
    state = DGSState(
        process_group=process_group if process_group is not None else ddp_model.process_group,
        density=density,
        start_step=start_step,
        momentum=momentum,
        weight_decay=weight_decay,
        download_density=download_density,
        download_resync_every=download_resync_every,
        min_k=min_k,
        named_parameters=ddp_model.module.named_parameters(),
    )
    ddp_model.register_comm_hook(state, dgs_hook)
    return state


STATE_TENSORS = "dgs_state.safetensors"
STATE_JSON = "dgs_state.json"


def save_state_files(state_dict: dict[str, Any], folder: str) -> list[str]:
    """Write a ``DGSState.state_dict()`` into ``folder`` as safetensors + JSON; no-op (returns []) for the
    velocity-less dict of a non-zero rank. Returns the file names written."""
    from safetensors.torch import save_file

    if state_dict.get("per_rank") is None:
        return []
    tensors = {}
    for r, velocities in enumerate(state_dict["per_rank"]):
        for name, t in velocities.items():
            tensors[f"per_rank.{r}.{name}"] = t.detach().cpu().contiguous()
    for name, t in state_dict["residual"].items():
        tensors[f"residual.{name}"] = t.detach().cpu().contiguous()
    meta = {k: state_dict[k] for k in ("format", "iter", "world_size", "hyperparameters", "counters")}
    meta["velocity_names"] = sorted(state_dict["per_rank"][0]) if state_dict["per_rank"] else []
    meta["residual_names"] = sorted(state_dict["residual"])
    save_file(tensors, os.path.join(folder, STATE_TENSORS))
    with open(os.path.join(folder, STATE_JSON), "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=1)
    return [STATE_TENSORS, STATE_JSON]


def load_state_files(folder: str) -> dict[str, Any]:
    """Read what ``save_state_files`` wrote back into a ``DGSState.state_dict()`` (no pickle involved)."""
    from safetensors.torch import load_file

    with open(os.path.join(folder, STATE_JSON), encoding="utf-8") as f:
        meta = json.load(f)
    if meta.get("format") != "upcycled_moe.dgs/1":
        raise ValueError(f"{os.path.join(folder, STATE_JSON)} is not a DGS state file")
    tensors = load_file(os.path.join(folder, STATE_TENSORS))
    per_rank = [{n: tensors[f"per_rank.{r}.{n}"] for n in meta["velocity_names"]} for r in range(meta["world_size"])]
    residual = {n: tensors[f"residual.{n}"] for n in meta["residual_names"]}
    return {k: meta[k] for k in ("format", "iter", "world_size", "hyperparameters", "counters")} | {
        "per_rank": per_rank, "residual": residual}
