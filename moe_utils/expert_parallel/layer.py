"""The expert-parallel MoE layer: every rank holds ``E / W`` experts, tokens travel by all-to-all.

Conventions of the course (notebook 10):

* ``W`` ranks, ``E`` experts, ``E_local = E / W`` on each rank (``E`` must divide). Rank
  ``r`` holds the global experts ``r * E_local ... (r + 1) * E_local - 1`` stacked in one
  ``ExpertBank``, so expert ``e`` lives on rank ``e // E_local`` (``expert_owner``).
* The router is replicated: every rank holds the same router weights and routes its own
  tokens. Its gradient on each rank covers that rank's tokens; summed over ranks it is
  the single-process gradient (data parallelism's all-reduce does this sum).
* Dropless step (the default):

  1. route the local tokens ``x: [T, d]`` and sort the kept slots by expert
     (``dispatch_metadata``); experts of one rank are consecutive ids, so this also sorts
     the rows by destination rank;
  2. exchange the counts (``exchange_header``): rank ``r`` learns how many rows each
     rank sends to each of its local experts, hence its receive split sizes;
  3. dispatch: ``all_to_all`` the rows with per-rank split sizes (nothing is dropped);
  4. run the local experts on the rows received (``moe_ffn``);
  5. combine: ``all_to_all`` the results back with the splits swapped, undo the sort
     (the inverse permutation), multiply by the routing weights and sum over ``k``.

* Capacity mode (GShard style), ``capacity_factor`` set or a router that applies capacity
  (``SwitchRouter``): the routing group is **one rank's tokens**. Capacity
  ``C = max(min_capacity, floor(CF * k * T / E))`` and position priority (first choices
  before second choices, earlier tokens first) are those of ``moe_utils.capacity``, on the
  rank's ``T`` tokens. Each rank fills a fixed buffer ``[E, C, d]`` (zeros where an
  expert got fewer than ``C`` rows) and sends ``E_local * C`` rows to every rank
  whatever the routing, so the capacity factor multiplies the communication volume.
  Every rank must then hold the same number of tokens (the same ``C``); the header
  exchange checks it. This equals the single-process layer routed in groups of ``T``
  tokens (``SwitchRouter(group_size=T)`` on the concatenated batch).

The returned ``aux_loss`` and ``z_loss`` are those of this rank's tokens (one rank = one
group for the balance statistics).
"""

from __future__ import annotations

import copy
import zlib
from dataclasses import dataclass

import torch
import torch.distributed as dist
from einops import rearrange, repeat
from torch import nn

from .._checks import check_float_tensor, check_last_dim, check_positive_float, check_positive_int
from ..capacity import capacity_mask, expert_capacity
from ..dispatch import dispatch_metadata, moe_ffn
from ..experts import ExpertBank
from ..layers import AUX_LOSSES, MoELayer, MoEOutput
from ..losses import router_z_loss, switch_load_balancing_loss, topk_load_balancing_loss
from ..routers import Routing
from .exchange import all_to_all, exchange_header

__all__ = ["ExpertParallelMoE", "ExpertParallelOutput", "expert_owner", "token_rank_matrix"]


def expert_owner(expert_ids: torch.Tensor, num_experts: int, world_size: int) -> torch.Tensor:
    """Rank holding each expert id: ``e // (E / W)`` (same shape as ``expert_ids``)."""
    if num_experts % world_size:
        raise ValueError(f"num_experts={num_experts} must be divisible by the world size {world_size}")
    return torch.div(expert_ids, num_experts // world_size, rounding_mode="floor")


def token_rank_matrix(
    indices: torch.Tensor, kept: torch.Tensor, tokens_per_rank: list[int], num_experts: int
) -> torch.Tensor:
    """Rows each rank sends to each rank in one dropless step: ``[W, W]`` int64.

    indices, kept: [T, k] routing of the concatenated batch, whose first
    ``tokens_per_rank[0]`` tokens live on rank 0, the next ones on rank 1, ...
    Entry ``[i, j]`` counts the kept (token, choice) slots of rank ``i`` whose expert lives
    on rank ``j``; the diagonal stays local, row sums are the rows sent, column sums
    the rows each rank receives (its expert work).
    """
    W = len(tokens_per_rank)
    if sum(tokens_per_rank) != indices.shape[0]:
        raise ValueError(f"tokens_per_rank must sum to the {indices.shape[0]} routed tokens, got {tokens_per_rank}")
    src = torch.repeat_interleave(torch.arange(W), torch.tensor(tokens_per_rank))  # [T] rank of each token
    src = src.to(indices.device).unsqueeze(1).expand_as(indices)[kept]
    dst = expert_owner(indices[kept], num_experts, W)
    return torch.bincount(src * W + dst, minlength=W * W).reshape(W, W)


@dataclass
class ExpertParallelOutput(MoEOutput):
    """``MoEOutput`` of this rank's tokens, plus the rows each dispatch all-to-all moved:

    rows_sent:     [W] int64, rows this rank sent to each rank (the combine sends them back)
    rows_received: [W] int64, rows it received from each rank (its experts' work)

    Rows are token vectors of ``d_model`` values; in capacity mode they are the fixed
    ``E_local * C`` per rank, empty buffer rows included.
    """

    rows_sent: torch.Tensor | None = None
    rows_received: torch.Tensor | None = None


def _crc(value) -> float:
    return float(zlib.crc32(str(value).encode()))


class ExpertParallelMoE(nn.Module):
    """An MoE layer whose experts are spread over the ranks of a process group.

    router:        replicated router (``TopKRouter``, ``SwitchRouter``...), the same on every rank
    experts:       this rank's ``ExpertBank`` of ``E / W`` experts (global ids ``rank * E/W ...``)
    group:         the process group (None: the default one, set up by ``init_process_group``)
    capacity_factor: None for dropless; a number for the GShard-style capacity mode
                   (per-rank routing group; the router must then be dropless)
    aux_loss, aux_loss_coef, z_loss_coef, backend: as in ``MoELayer``

    Construction is collective: every rank of the group must construct the layer, and the
    ranks compare a fingerprint of their configuration (an ``all_gather``).
    ``ExpertParallelMoE.from_layer(layer)`` cuts a single-process ``MoELayer`` into its
    expert-parallel version.
    """

    def __init__(
        self,
        router: nn.Module,
        experts: ExpertBank,
        group=None,
        capacity_factor: float | None = None,
        min_capacity: int = 4,
        aux_loss: str | None = "switch",
        aux_loss_coef: float = 1e-2,
        z_loss_coef: float = 0.0,
        backend: str = "auto",
    ):
        super().__init__()
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(
                "ExpertParallelMoE needs an initialised torch.distributed process group: call "
                "torch.distributed.init_process_group('gloo' or 'nccl', ...) first, or start the script "
                "with torchrun (or moe_utils.expert_parallel.launch)"
            )
        self.group = group
        self.world_size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        try:  # a rank with bad arguments still joins the configuration check, so nobody waits
            self._set_up(router, experts, capacity_factor, min_capacity, aux_loss, aux_loss_coef, z_loss_coef)
            problem = None
        except (TypeError, ValueError) as e:
            problem = e
        self.backend = backend
        self._check_ranks_agree(problem)

    def _set_up(self, router, experts, capacity_factor, min_capacity, aux_loss, aux_loss_coef, z_loss_coef):
        if not isinstance(experts, ExpertBank):
            raise TypeError(f"experts must be an ExpertBank, got {type(experts).__name__}")
        if aux_loss not in AUX_LOSSES:
            raise ValueError(f"aux_loss must be one of {AUX_LOSSES}, got {aux_loss!r}")
        num_experts = check_positive_int("router.num_experts", getattr(router, "num_experts", None))
        if num_experts % self.world_size:
            raise ValueError(
                f"num_experts={num_experts} must be divisible by the world size {self.world_size} "
                "(every rank holds num_experts / world_size experts)"
            )
        if experts.num_experts != num_experts // self.world_size:
            raise ValueError(
                f"experts must hold num_experts / world_size = {num_experts // self.world_size} experts "
                f"(this rank's share), got {experts.num_experts}"
            )
        if getattr(router, "d_model", experts.d_model) != experts.d_model:
            raise ValueError(f"router.d_model={router.d_model} must equal experts.d_model={experts.d_model}")
        self.router, self.experts = router, experts
        self.num_experts = num_experts
        self.capacity_factor = None if capacity_factor is None else check_positive_float("capacity_factor", capacity_factor)
        self.min_capacity = check_positive_int("min_capacity", min_capacity, minimum=0)
        self.aux_loss = aux_loss
        self.aux_loss_coef = check_positive_float("aux_loss_coef", aux_loss_coef, allow_zero=True)
        self.z_loss_coef = check_positive_float("z_loss_coef", z_loss_coef, allow_zero=True)

    @classmethod
    def from_layer(cls, layer: MoELayer, group=None, capacity_factor: float | None = None, min_capacity: int = 4):
        """This rank's share of a single-process ``MoELayer`` (same weights on every rank).

        Copies the router and slices the stacked expert weights ``[E, ...]`` down to this
        rank's ``[E / W, ...]``; the original layer is left untouched. Collective, like
        the constructor.
        """
        if not isinstance(layer, MoELayer):
            raise TypeError(f"layer must be a MoELayer, got {type(layer).__name__}")
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("from_layer needs an initialised torch.distributed process group (init_process_group)")
        W, r, E = dist.get_world_size(group), dist.get_rank(group), layer.num_experts
        src = layer.experts
        bank = src  # E not divisible by W: the constructor reports it on every rank
        if E % W == 0:
            mine = slice(r * E // W, (r + 1) * E // W)
            bank = ExpertBank(E // W, src.d_model, src.d_ff, kind=src.kind).to(device=src.w1.device, dtype=src.w1.dtype)
            with torch.no_grad():
                for name in ("w1", "w2", "w3"):
                    if getattr(src, name) is not None:
                        getattr(bank, name).copy_(getattr(src, name)[mine])
        ep = cls(
            copy.deepcopy(layer.router), bank, group, capacity_factor, min_capacity,
            layer.aux_loss, layer.aux_loss_coef, layer.z_loss_coef, layer.backend,
        )
        return ep.train(layer.training)

    # ------------------------------------------------------------------ configuration check

    FINGERPRINT = (
        "world_size", "num_experts", "d_model", "d_ff", "expert kind", "expert dtype", "router type",
        "router settings", "router weights", "capacity_factor", "min_capacity", "aux_loss", "loss coefficients",
    )

    def fingerprint(self) -> dict[str, float]:
        """What every rank must agree on, as numbers (strings and weights as CRC32 hashes)."""
        weights = 0
        for _, t in sorted(self.router.state_dict().items()):
            weights = zlib.crc32(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes(), weights)
        values = (
            self.world_size, self.num_experts, self.experts.d_model, self.experts.d_ff,
            _crc(self.experts.kind), _crc(self.experts.w1.dtype), _crc(type(self.router).__name__),
            _crc(self.router.extra_repr()), float(weights),
            -1.0 if self.capacity_factor is None else self.capacity_factor, self.min_capacity,
            _crc(self.aux_loss), _crc((self.aux_loss_coef, self.z_loss_coef)),
        )
        return dict(zip(self.FINGERPRINT, values))

    def _check_ranks_agree(self, problem: Exception | None) -> None:
        """All-gather ``[failed, fingerprint...]`` from every rank and compare the columns."""
        n = len(self.FINGERPRINT)
        mine = [1.0] + [0.0] * n if problem else [0.0] + list(self.fingerprint().values())
        local = torch.tensor(mine, dtype=torch.float64, device=_comm_device(self.group))
        every = [torch.empty_like(local) for _ in range(self.world_size)]
        dist.all_gather(every, local, group=self.group)
        table = torch.stack(every).cpu()  # [W, 1 + fields]
        if problem is not None:
            raise problem
        failed = [i for i in range(self.world_size) if table[i, 0]]
        if failed:
            raise RuntimeError(f"rank(s) {failed} rejected their arguments to ExpertParallelMoE (see their traceback)")
        bad = [
            f"{name}: {[int(v) if v == int(v) else v for v in table[:, 1 + i].tolist()]}"
            for i, name in enumerate(self.FINGERPRINT)
            if not bool((table[:, 1 + i] == table[0, 1 + i]).all())
        ]
        if bad:
            raise ValueError(
                "ranks disagree on the expert-parallel configuration (value per rank; hashes for "
                "strings and weights): " + "; ".join(bad) + ". Build the layer identically on every "
                "rank (same seed, or ExpertParallelMoE.from_layer on the same MoELayer)"
            )

    # ------------------------------------------------------------------ forward

    def forward(self, x: torch.Tensor) -> ExpertParallelOutput:
        """x: [..., d_model] this rank's tokens -> ``ExpertParallelOutput`` (output [..., d_model]).

        Collective: every rank must call it (with T = 0 tokens if it has none), and, when
        training, run backward through the output, since the backward pass exchanges the
        gradients with the same two all-to-alls.
        """
        try:
            x2, routing = self._route(x)
        except Exception:
            # take part in the header exchange anyway, flagged, so the other ranks stop too
            nothing = torch.zeros(self.num_experts, dtype=torch.int64, device=_comm_device(self.group))
            exchange_header(nothing, self.world_size, failed=True, group=self.group)
            raise
        if routing.capacity is None:
            y, sent, received = self._dropless(x2, routing)
        else:
            y, sent, received = self._with_capacity(x2, routing)
        aux, z = self._losses(routing, x2)
        return ExpertParallelOutput(y.reshape(x.shape), routing, aux, z, sent, received)

    def _route(self, x: torch.Tensor) -> tuple[torch.Tensor, Routing]:
        """Check x, route it, and apply capacity in capacity mode. Purely local."""
        check_float_tensor("x", x)
        if x.dim() < 2:
            raise ValueError(f"x must have shape [..., d_model] with at least 2 dimensions, got {tuple(x.shape)}")
        check_last_dim("x", x, self.experts.d_model)
        if x.dtype != self.experts.w1.dtype or x.device != self.experts.w1.device:
            raise TypeError(
                f"x must have the experts' dtype and device ({self.experts.w1.dtype}, {self.experts.w1.device}), "
                f"got ({x.dtype}, {x.device})"
            )
        x2 = x.reshape(-1, self.experts.d_model)  # [T, d]
        T = x2.shape[0]
        r = self.router(x2)
        if r.capacity is not None:  # a router that applies capacity itself (SwitchRouter)
            if self.capacity_factor is not None:
                raise ValueError(
                    "the router already applies capacity; set capacity_factor on the router or on "
                    "ExpertParallelMoE, not both"
                )
            if getattr(self.router, "group_size", None) not in (None, T):
                raise ValueError(
                    f"router.group_size={self.router.group_size} is not supported: the routing group of "
                    f"the expert-parallel layer is one rank's tokens (group_size=None, or T={T})"
                )
            return x2, r
        if self.capacity_factor is not None:
            C = expert_capacity(T, self.num_experts, self.capacity_factor, r.k, self.min_capacity)
            kept, pos = capacity_mask(r.indices, self.num_experts, C)  # per-rank group, position priority
            r = Routing(r.indices, r.weights, kept, r.num_experts, r.probs, r.logits, capacity=C, positions=pos)
        return x2, r

    def _local_experts(self, rows: torch.Tensor, local_ids: torch.Tensor) -> torch.Tensor:
        """Run this rank's experts: rows [R, d], local_ids [R] in [0, E_local) -> [R, d]."""
        one = torch.ones(rows.shape[0], 1, dtype=torch.float32, device=rows.device)
        routing = Routing.fixed(local_ids.unsqueeze(1), one, self.experts.num_experts)
        return moe_ffn(rows, routing, self.experts, backend=self.backend)

    def _dropless(self, x: torch.Tensor, routing: Routing):
        T, k = routing.indices.shape
        W, E_local = self.world_size, self.experts.num_experts
        meta = dispatch_metadata(routing)  # kept slots sorted by expert, hence by destination rank
        received, _, failed = exchange_header(meta.counts, W, group=self.group)  # [W, E_local]
        self._stop_if_failed(failed)
        send = rearrange(meta.counts, "(w e) -> w e", w=W).sum(1).tolist()
        recv = received.sum(1).tolist()
        slots = meta.sorted_slots[: sum(send)]  # [M] kept slots, grouped by destination rank
        x_send = self._always_differentiable(x.index_select(0, slots // k))  # [M, d]
        x_recv = all_to_all(x_send, send, recv, self.group)  # [R, d]: by source rank, then local expert
        local_ids = torch.repeat_interleave(
            torch.arange(E_local, device=x.device).repeat(W), received.reshape(-1).to(x.device)
        )
        y_recv = self._local_experts(x_recv, local_ids)
        y_back = all_to_all(y_recv, recv, send, self.group)  # [M, d], in x_send's order
        y_slots = y_back.new_zeros(T * k, x.shape[1]).index_copy(0, slots, y_back)  # undo the sort
        return self._combine(y_slots, routing), _ints(send), _ints(recv)

    def _with_capacity(self, x: torch.Tensor, routing: Routing):
        T, k = routing.indices.shape
        W, E, E_local, C = self.world_size, self.num_experts, self.experts.num_experts, routing.capacity
        _, capacities, failed = exchange_header(routing.kept_per_expert(), W, capacity=C, group=self.group)
        self._stop_if_failed(failed)
        if not bool((capacities == C).all()):
            raise ValueError(
                f"capacity mode needs the same capacity C on every rank, got C = {capacities.tolist()} per rank: "
                "the routing group is one rank's tokens, so every rank must hold the same number of tokens"
            )
        kept = routing.kept.reshape(-1)  # [T*k]
        slots = torch.arange(T * k, device=x.device)[kept]
        rows = (routing.indices * C + routing.positions).reshape(-1)[kept]  # row in the [E*C] buffer
        buf = x.new_zeros(E * C, x.shape[1]).index_copy(0, rows, x.index_select(0, slots // k))
        splits = [E_local * C] * W  # fixed: E_local * C rows to every rank, whatever the routing
        x_recv = all_to_all(self._always_differentiable(buf), splits, splits, self.group)  # [W*E_local*C, d]
        local_ids = repeat(torch.arange(E_local, device=x.device), "e -> (w e c)", w=W, c=C)
        y_recv = self._local_experts(x_recv, local_ids)  # empty rows too, as GShard's static shapes do
        y_back = all_to_all(y_recv, splits, splits, self.group)  # [E*C, d], our buffer layout
        y_slots = y_back.new_zeros(T * k, x.shape[1]).index_copy(0, slots, y_back.index_select(0, rows))
        return self._combine(y_slots, routing), _ints(splits), _ints(splits)

    def _combine(self, y_slots: torch.Tensor, routing: Routing) -> torch.Tensor:
        """y_slots: [T*k, d] expert outputs in slot order (0 where dropped) -> y: [T, d]."""
        T, k = routing.indices.shape
        w = routing.weights.to(y_slots.dtype)  # dropped slots already hold 0
        return (y_slots.view(T, k, y_slots.shape[1]) * w.unsqueeze(-1)).sum(1)

    def _always_differentiable(self, rows: torch.Tensor) -> torch.Tensor:
        # if x needs no gradient on this rank but does on another, this rank would skip the
        # dispatch all-to-all in backward and the others would wait for it: never skip it
        if torch.is_grad_enabled() and not rows.requires_grad:
            rows.requires_grad_(True)
        return rows

    def _stop_if_failed(self, failed: list[int]) -> None:
        if failed:
            raise RuntimeError(
                f"rank(s) {failed} raised an error before the all-to-all (see their traceback); "
                f"rank {self.rank} stops too instead of waiting for them"
            )

    def _losses(self, routing: Routing, x2: torch.Tensor):
        zero = x2.new_zeros((), dtype=torch.float32)
        aux = zero
        if self.aux_loss == "switch" and routing.probs is not None:
            aux = switch_load_balancing_loss(routing.probs, routing.indices, alpha=self.aux_loss_coef)
        elif self.aux_loss == "topk" and routing.probs is not None:
            aux = self.aux_loss_coef * topk_load_balancing_loss(routing.probs, routing.indices)
        z = self.z_loss_coef * router_z_loss(routing.logits) if routing.logits is not None else zero
        return aux, z

    def extra_repr(self) -> str:
        mode = "dropless" if self.capacity_factor is None else f"capacity_factor={self.capacity_factor}"
        return f"rank={self.rank}, world_size={self.world_size}, num_experts={self.num_experts}, {mode}"


def _ints(values: list[int]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int64)


def _comm_device(group) -> torch.device:
    """Where this process group's collectives take their tensors: the current GPU for nccl."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
