"""ex10_expert_parallel: one expert-parallel step by hand (split sizes, the dispatch
permutation, the all-to-all, the combine) and what its exchange costs.

Conventions (notebook 10, ``moe_utils/expert_parallel/layer.py``): ``W`` ranks, ``E``
experts, ``E_local = E / W`` per rank, expert ``e`` on rank ``e // E_local``; a rank sends
one row per kept (token, choice) slot, sorted by expert (hence by destination rank),
and receives rows grouped by source rank, then by local expert. The all-to-all is
``torch.distributed.all_to_all_single``'s, simulated with a list of ranks.
"""

from __future__ import annotations

import torch

from ..spec import Case, Exercise, Question, Rand, WrongAnswer, distinct_choices, randint

NAME = "ex10_expert_parallel"
F64 = torch.float64

# the worked example of the notebook: rank 0 of W = 2 ranks, E = 4 experts, top-2;
# token 3's second choice is dropped (kept False), every other slot is kept
EXAMPLE_INDICES = [[2, 0], [1, 3], [0, 2], [3, 0], [2, 1]]
EXAMPLE_KEPT = [[True, True], [True, True], [True, True], [True, False], [True, True]]
EXAMPLE_WEIGHTS = [[0.7, 0.3], [0.6, 0.4], [0.9, 0.1], [1.0, 0.0], [0.5, 0.5]]
# rank 1 of the example sends [2, 2, 1, 1] rows to experts 0..3; rank 0 sends [2, 2, 3, 2]
EXAMPLE_COUNTS = [[2, 2, 3, 2], [2, 2, 1, 1]]


def example_routing() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.tensor(EXAMPLE_INDICES), torch.tensor(EXAMPLE_KEPT)


# -- references: written here from the definitions, independent of the rest of moe_utils ------


def ref_send_splits(indices, kept, num_experts, world_size):
    per_rank = num_experts // world_size
    out = [0] * world_size
    for e, keep in zip(indices.reshape(-1).tolist(), kept.reshape(-1).tolist()):
        if keep:
            out[e // per_rank] += 1
    return torch.tensor(out, dtype=torch.int64)


def ref_dispatch_order(indices, kept):
    flat, keep = indices.reshape(-1).tolist(), kept.reshape(-1).tolist()
    slots = sorted((s for s in range(len(flat)) if keep[s]), key=lambda s: (flat[s], s))
    return torch.tensor(slots, dtype=torch.int64)


def ref_recv_splits(counts, rank, world_size):
    per_rank = counts.shape[1] // world_size
    mine = range(rank * per_rank, (rank + 1) * per_rank)
    return torch.tensor([sum(int(counts[i, e]) for e in mine) for i in range(world_size)], dtype=torch.int64)


def ref_local_expert_ids(counts, rank, world_size):
    per_rank = counts.shape[1] // world_size
    ids = []
    for source in range(world_size):  # rows arrive by source rank ...
        for e in range(per_rank):  # ... and, from each source, sorted by expert
            ids += [e] * int(counts[source, rank * per_rank + e])
    return torch.tensor(ids, dtype=torch.int64)


def ref_simulate_all_to_all(rows, splits):
    W = len(rows)
    received = [[] for _ in range(W)]
    for i in range(W):
        start = 0
        for j in range(W):
            n = int(splits[i, j])
            received[j].append(rows[i][start:start + n])  # rank i's piece j goes to rank j
            start += n
    return tuple(torch.cat(pieces) for pieces in received)


def ref_combine_back(y_back, slots, weights):
    T, k = weights.shape
    y = torch.zeros(T, y_back.shape[1], dtype=y_back.dtype)
    for p, s in enumerate(slots.tolist()):
        t, j = divmod(s, k)
        y[t] = y[t] + weights[t, j].to(y_back.dtype) * y_back[p]
    return y


def ref_bytes_per_token(k, d, bytes_dispatch, bytes_combine, local_fraction):
    remote_copies = k * (1 - local_fraction)
    return float(remote_copies * d * bytes_dispatch + remote_copies * d * bytes_combine)


def ref_exchange_seconds(num_tokens, bytes_per_token, link_gbit_per_s, latency_s):
    link_bytes_per_s = link_gbit_per_s * 1e9 / 8  # network links are rated in bits per second
    return float(2 * latency_s + num_tokens * bytes_per_token / link_bytes_per_s)


# -- known mistakes, as code ---------------------------------------------------------------------


def _send_modulo(indices, kept, num_experts, world_size):
    return torch.bincount(indices[kept] % world_size, minlength=world_size)


def _send_ignoring_kept(indices, kept, num_experts, world_size):
    return torch.bincount(indices.reshape(-1) // (num_experts // world_size), minlength=world_size)


def _send_tokens_not_slots(indices, kept, num_experts, world_size):
    owner = indices // (num_experts // world_size)
    out = torch.zeros(world_size, dtype=torch.int64)
    for t in range(indices.shape[0]):
        for r in set(owner[t][kept[t]].tolist()):
            out[r] += 1
    return out


def _order_unsorted(indices, kept):
    return torch.nonzero(kept.reshape(-1))[:, 0]


def _order_with_dropped(indices, kept):
    return torch.argsort(indices.reshape(-1), stable=True)


def _order_token_ids(indices, kept):
    return ref_dispatch_order(indices, kept) // indices.shape[1]


def _order_reversed_ties(indices, kept):
    slots = torch.nonzero(kept.reshape(-1))[:, 0]
    experts = indices.reshape(-1)[slots]
    return slots[torch.argsort(experts, descending=True, stable=True).flip(0)]


def _recv_own_row(counts, rank, world_size):
    return counts[rank].reshape(world_size, -1).sum(1)


def _recv_modulo(counts, rank, world_size):
    return counts[:, rank::world_size].sum(1)


def _recv_without_local(counts, rank, world_size):
    splits = ref_recv_splits(counts, rank, world_size)
    splits[rank] = 0
    return splits


def _ids_expert_major(counts, rank, world_size):
    per_rank = counts.shape[1] // world_size
    mine = counts[:, rank * per_rank:(rank + 1) * per_rank]
    return torch.repeat_interleave(torch.arange(per_rank), mine.sum(0))


def _ids_global(counts, rank, world_size):
    return ref_local_expert_ids(counts, rank, world_size) + rank * (counts.shape[1] // world_size)


def _ids_own_row(counts, rank, world_size):
    per_rank = counts.shape[1] // world_size
    return torch.repeat_interleave(torch.arange(per_rank).repeat(world_size), counts[rank])


def _a2a_without_local(rows, splits):
    W = len(rows)
    pieces = [r.split(s.tolist()) for r, s in zip(rows, splits)]
    return tuple(torch.cat([pieces[i][j] for i in range(W) if i != j]) for j in range(W))


def _a2a_pieces_swapped(rows, splits):
    W = len(rows)
    pieces = [r.split(s.tolist()) for r, s in zip(rows, splits)]
    return tuple(torch.cat([pieces[j][i] for i in range(W)]) for j in range(W))  # [j][i], not [i][j]


def _combine_in_arrival_order(y_back, slots, weights):
    T, k = weights.shape
    y_slots = torch.cat([y_back, y_back.new_zeros(T * k - y_back.shape[0], y_back.shape[1])])
    return (y_slots.reshape(T, k, -1) * weights.to(y_back.dtype)[:, :, None]).sum(1)


def _combine_unweighted(y_back, slots, weights):
    return ref_combine_back(y_back, slots, torch.ones_like(weights))


def _combine_weights_in_arrival_order(y_back, slots, weights):
    T, k = weights.shape
    w = weights.reshape(-1)[: y_back.shape[0]].to(y_back.dtype)  # weight p, not slots[p]
    y_slots = y_back.new_zeros(T * k, y_back.shape[1]).index_copy(0, slots, y_back * w[:, None])
    return y_slots.reshape(T, k, -1).sum(1)


# -- cases ---------------------------------------------------------------------------------------


def _dropped(h: Rand, T: int, k: int) -> torch.Tensor:
    """A random kept mask with about a quarter of the slots dropped."""
    return h.randint(4, T, k) > 0


def cases_send_splits(h: Rand) -> list[Case]:
    indices, kept = example_routing()
    full = torch.ones(8, 2, dtype=torch.bool)
    return [
        Case("worked example: W=2, E=4, top-2, token 3's second choice dropped", (indices, kept, 4, 2),
             expected=torch.tensor([4, 5])),
        Case("random top-2, every slot kept, W=4 E=8", (distinct_choices(1001, 8, 8, 2), full, 8, 4)),
        Case("the last rank gets no row, W=3 E=6", (Rand(1002).choices(7, 4, 2), torch.ones(7, 2, dtype=torch.bool),
                                                    6, 3),
             hint="one entry per rank, in rank order, even for a rank that gets no row"),
        Case("random top-2 with drops, W=2 E=8 (a token can send two rows to one rank)",
             (h.choices(12, 8, 2), _dropped(h, 12, 2), 8, 2), public=False),
        Case("random top-3 with drops, W=4 E=16", (h.choices(20, 16, 3), _dropped(h, 20, 3), 16, 4), public=False),
        Case("top-1, one expert per rank, W=E=4", (h.randint(4, 9, 1), torch.ones(9, 1, dtype=torch.bool), 4, 4),
             public=False),
        Case("one rank: everything stays local, W=1 E=4", (h.choices(6, 4, 2), _dropped(h, 6, 2), 4, 1), public=False),
        Case("nothing kept, W=2 E=4", (h.choices(5, 4, 2), torch.zeros(5, 2, dtype=torch.bool), 4, 2), public=False),
        Case("a rank with no tokens (T = 0), W=4 E=8",
             (torch.zeros(0, 2, dtype=torch.int64), torch.zeros(0, 2, dtype=torch.bool), 8, 4), public=False),
        Case("only the first two of four ranks get rows, W=4 E=8",
             (h.choices(10, 4, 2), torch.ones(10, 2, dtype=torch.bool), 8, 4), public=False),
    ]


def cases_dispatch_order(h: Rand) -> list[Case]:
    indices, kept = example_routing()
    return [
        Case("worked example: token 3's second choice (slot 7) is not sent", (indices, kept),
             expected=torch.tensor([1, 4, 2, 9, 0, 5, 8, 3, 6])),
        Case("random top-2, every slot kept, T=8 E=4", (distinct_choices(1011, 8, 4, 2), torch.ones(8, 2, dtype=torch.bool))),
        Case("random top-2 with drops, T=10 E=6", (Rand(1012).choices(10, 6, 2), _dropped(Rand(1013), 10, 2))),
        Case("top-1 with many ties and drops, T=30 E=3", (h.randint(3, 30, 1), _dropped(h, 30, 1)), public=False),
        Case("random top-3 with drops, T=16 E=8", (h.choices(16, 8, 3), _dropped(h, 16, 3)), public=False),
        Case("every slot on one expert, T=6 k=2", (torch.full((6, 2), 3), torch.ones(6, 2, dtype=torch.bool)),
             public=False),
        Case("nothing kept", (h.choices(4, 4, 2), torch.zeros(4, 2, dtype=torch.bool)), public=False),
        Case("a rank with no tokens (T = 0)", (torch.zeros(0, 2, dtype=torch.int64), torch.zeros(0, 2, dtype=torch.bool)),
             public=False),
    ]


def _counts(h: Rand, W: int, E: int) -> torch.Tensor:
    return h.randint(4, W, E)


def cases_recv_splits(h: Rand) -> list[Case]:
    ex = torch.tensor(EXAMPLE_COUNTS)
    spec = torch.tensor([[1, 2, 3, 1], [2, 1, 0, 2]])
    big = _counts(h, 4, 8)
    cases = [
        Case("worked example, rank 0 (W=2, E=4)", (ex, 0, 2), expected=torch.tensor([4, 4])),
        Case("worked example, rank 1", (ex, 1, 2), expected=torch.tensor([5, 2])),
        Case("rank 1 sends nothing to expert 2; rank 1 of W=2", (spec, 1, 2), expected=torch.tensor([4, 2])),
        Case("random counts, rank 2 of W=4, E=8", (randint(1021, 5, 4, 8), 2, 4)),
    ]
    cases += [Case(f"random counts, rank {r} of W=4, E=8", (big, r, 4), public=False) for r in range(4)]
    zero_col = _counts(h, 3, 6)
    zero_col[:, 2:4] = 0
    return cases + [
        Case("a rank that receives nothing, rank 1 of W=3, E=6", (zero_col, 1, 3), public=False),
        Case("one expert per rank, rank 3 of W=E=4", (_counts(h, 4, 4), 3, 4), public=False),
        Case("one rank, W=1, E=4", (_counts(h, 1, 4), 0, 1), public=False),
        Case("random counts, a random rank of W=8, E=16", (_counts(h, 8, 16), h.integer(0, 7), 8), public=False),
    ]


def cases_local_expert_ids(h: Rand) -> list[Case]:
    ex = torch.tensor(EXAMPLE_COUNTS)
    spec = torch.tensor([[1, 2, 3, 1], [2, 1, 0, 2]])
    big = _counts(h, 4, 8)
    cases = [
        Case("worked example, rank 0 (W=2, E=4)", (ex, 0, 2), expected=torch.tensor([0, 0, 1, 1, 0, 0, 1, 1])),
        Case("worked example, rank 1", (ex, 1, 2), expected=torch.tensor([0, 0, 0, 1, 1, 0, 1])),
        Case("rank 0 of W=2 (rank 1 sends nothing for expert 2)", (spec, 0, 2),
             expected=torch.tensor([0, 1, 1, 0, 0, 1])),
        Case("random counts, rank 1 of W=4, E=8", (randint(1031, 4, 4, 8), 1, 4)),
    ]
    cases += [Case(f"random counts, rank {r} of W=4, E=8", (big, r, 4), public=False) for r in range(4)]
    return cases + [
        Case("one expert per rank, rank 2 of W=E=4", (_counts(h, 4, 4), 2, 4), public=False),
        Case("three experts per rank, rank 1 of W=2, E=6", (_counts(h, 2, 6), 1, 2), public=False),
        Case("a rank that receives nothing, rank 0 of W=2, E=4",
             (torch.tensor([[0, 0, 2, 1], [0, 0, 1, 3]]), 0, 2), public=False),
    ]


def _rows_for(h: Rand, splits: torch.Tensor, d: int, dtype=torch.float32) -> list[torch.Tensor]:
    return [h.randn(int(n), d, dtype=dtype) for n in splits.sum(1).tolist()]


def cases_simulate_all_to_all(h: Rand) -> list[Case]:
    ex_splits = torch.tensor([[4, 5], [4, 2]])  # the worked example's send splits
    ex_rows = [torch.arange(9.0)[:, None], 100 + torch.arange(6.0)[:, None]]
    r3 = Rand(1041)
    s3 = r3.randint(4, 3, 3)
    big = h.randint(5, 4, 4)
    empty = h.randint(4, 3, 3)
    empty[1] = 0  # rank 1 sends nothing (a rank with T = 0)
    one = h.randint(6, 1, 1)
    back = h.randint(4, 3, 3)
    return [
        Case("worked example: rank 0 sends [4, 5] rows, rank 1 [4, 2]; row values say where they come from",
             (ex_rows, ex_splits),
             expected=(torch.tensor([0.0, 1, 2, 3, 100, 101, 102, 103])[:, None],
                       torch.tensor([4.0, 5, 6, 7, 8, 104, 105])[:, None])),
        Case("random splits, W=3, d=4", (_rows_for(r3, s3, 4), s3)),
        Case("random splits with zeros, W=4, d=3, float64", (_rows_for(h, big, 3, F64), big), public=False),
        Case("rank 1 has no rows to send, W=3", (_rows_for(h, empty, 2), empty), public=False),
        Case("one rank, W=1", (_rows_for(h, one, 5), one), public=False),
        Case("the way back: received rows sent home with the splits transposed, W=3",
             (_rows_for(h, back.T.contiguous(), 2), back.T.contiguous()), public=False),
    ]


def _combine_case(r: Rand, T: int, E: int, k: int, d: int, dtype=torch.float32, drop: bool = True):
    indices = r.choices(T, E, k)
    kept = _dropped(r, T, k) if drop else torch.ones(T, k, dtype=torch.bool)
    slots = ref_dispatch_order(indices, kept)
    return r.randn(slots.numel(), d, dtype=dtype), slots, r.probs(T, k, dtype=dtype)


def cases_combine_back(h: Rand) -> list[Case]:
    indices, kept = example_routing()
    slots = ref_dispatch_order(indices, kept)
    y_back = torch.arange(1.0, 10.0, dtype=F64)[:, None]  # row p holds p + 1
    weights = torch.tensor(EXAMPLE_WEIGHTS, dtype=F64)
    return [
        Case("worked example: row p of y_back holds p + 1, d = 1", (y_back, slots, weights),
             expected=torch.tensor([[3.8], [5.0], [2.4], [9.0], [5.5]], dtype=F64)),
        Case("random top-2, every slot kept, T=6 E=4 d=3", _combine_case(Rand(1051), 6, 4, 2, 3, drop=False)),
        Case("random top-2 with drops, T=8 E=4 d=2", _combine_case(Rand(1052), 8, 4, 2, 2)),
        Case("a rank with no tokens: T = 0, y_back [0, 3]",
             (torch.zeros(0, 3), torch.zeros(0, dtype=torch.int64), torch.zeros(0, 2))),
        Case("random top-3 with drops, T=9 E=6 d=4 float64", _combine_case(h, 9, 6, 3, 4, F64), public=False),
        Case("top-1 with drops, T=7 E=3 d=2", _combine_case(h, 7, 3, 1, 2), public=False),
        Case("gradient flows to y_back and weights, T=5 E=4 k=2 float64", _combine_case(h, 5, 4, 2, 3, F64),
             grad=(0, 2), public=False),
        Case("nothing kept: every token's output is 0", (h.randn(0, 2), torch.zeros(0, dtype=torch.int64),
                                                         h.probs(4, 2)), public=False),
    ]


def cases_bytes_per_token(h: Rand) -> list[Case]:
    exact = dict(atol=0.0, rtol=1e-9)
    return [
        # first the case on which every known mistake gives a different number (the first
        # failing case names the mistake; on Mixtral's numbers "k left out" equals "no combine")
        Case("DeepSeek-V3-like, no node limit: k=8, d=7168, FP8 out, BF16 back, 1/8 local", (8, 7168, 1, 2, 0.125),
             expected=150528.0, **exact),
        Case("Mixtral 8x7B on 8 GPUs: k=2, d=4096, bf16 both ways, 1/8 local", (2, 4096, 2, 2, 0.125),
             expected=28672.0, **exact),
        Case("node-limited: 4 copies (one per node), none local", (4, 7168, 1, 2, 0.0), expected=86016.0, **exact),
        Case("one rank: everything local", (2, 1024, 2, 2, 1.0), expected=0.0, **exact),
        Case("random layer", (h.integer(1, 8), h.pick((512, 1024, 2048, 4096, 5120, 7168)), h.pick((1, 2, 4)),
                              h.pick((1, 2, 4)), h.pick((0.0, 0.125, 0.25, 0.5, 1 / 64))), public=False, **exact),
        Case("k=1, fp32 both ways, half local", (1, 768, 4, 4, 0.5), public=False, **exact),
        Case("k=6, d=2048, FP8 out and BF16 back, 1/16 local", (6, 2048, 1, 2, 0.0625), public=False, **exact),
    ]


def cases_exchange_seconds(h: Rand) -> list[Case]:
    exact = dict(atol=0.0, rtol=1e-9)
    return [
        Case("400 Gb/s moves 50 GB in one second (no latency)", (1_000_000, 50_000, 400, 0.0), expected=1.0, **exact),
        Case("Mixtral over InfiniBand: 4096 tokens of 28672 bytes, 400 Gb/s, 20 us", (4096, 28672, 400, 20e-6),
             expected=0.00238881024, **exact),
        Case("no tokens: only the two latencies", (0, 28672, 400, 20e-6), expected=4e-5, **exact),
        Case("NVLink-class link, 3600 Gb/s, 8192 tokens", (8192, 86016, 3600, 5e-6), public=False, **exact),
        Case("random micro-batch and link", (h.integer(1, 65536), h.pick((28672, 86016, 150528, 4096)),
                                             h.pick((100, 200, 400, 800)), h.pick((5e-6, 1e-5, 2e-5, 5e-5))),
             public=False, **exact),
        Case("one token, high latency", (1, 16384, 200, 1e-4), public=False, **exact),
    ]


_SPLIT_SHAPE = "one entry per rank, in rank order, shape [world_size]: bincount's minlength=world_size keeps ranks that get nothing"
_INT64 = "return an int64 tensor (bincount, sum, argsort, nonzero and repeat_interleave of int64 tensors give one)"

EXERCISE = Exercise(
    name=NAME,
    title="Expert parallelism by hand: split sizes, dispatch order, all-to-all, combine, cost",
    lecture="10_expert_parallelism",
    questions=[
        Question(
            NAME, "send_splits", 2, "send_splits(indices, kept, num_experts, world_size) -> splits [W] int64",
            ref_send_splits, cases_send_splits,
            "expert e lives on rank e // (num_experts // world_size); count the KEPT (token, choice) slots per "
            "destination rank, one row per slot, your own rank included",
            hints={"shape": _SPLIT_SHAPE, "dtype": _INT64,
                   "type": "return a tensor of W counts (torch.bincount gives one), not a list"},
            wrong_answers=(
                WrongAnswer("expert e is placed on rank e % world_size", _send_modulo,
                            "experts are in consecutive blocks: rank r holds r*E_local ... (r+1)*E_local - 1, so "
                            "expert e lives on rank e // E_local"),
                WrongAnswer("dropped slots are counted too", _send_ignoring_kept,
                            "only kept slots are sent: count indices[kept]"),
                WrongAnswer("a token with two experts on one rank is counted once", _send_tokens_not_slots,
                            "every kept (token, choice) slot is one row, even when two choices of a token go to "
                            "the same rank"),
            ),
        ),
        Question(
            NAME, "dispatch_order", 2, "dispatch_order(indices, kept) -> slots [M] int64",
            ref_dispatch_order, cases_dispatch_order,
            "take the kept slot ids s = t*k + j (in ascending order) and sort them by their expert with a stable "
            "sort, so that ties keep slot order",
            hints={"shape": "one entry per kept slot: shape [kept.sum()]; dropped slots are not sent",
                   "dtype": _INT64},
            wrong_answers=(
                WrongAnswer("the kept slots are not sorted by expert", _order_unsorted,
                            "the all-to-all sends consecutive pieces, one per rank: sort the rows by expert "
                            "(experts of a rank have consecutive ids, so this groups them by rank)"),
                WrongAnswer("dropped slots are sent too", _order_with_dropped,
                            "leave out the slots with kept False"),
                WrongAnswer("token ids instead of slot ids", _order_token_ids,
                            "return slot ids s = t*k + j (the combine needs the choice j too), not tokens t"),
                WrongAnswer("slots of the same expert are in reverse slot order", _order_reversed_ties,
                            "use a stable ascending sort: slots with the same expert keep ascending slot order"),
            ),
        ),
        Question(
            NAME, "recv_splits", 2, "recv_splits(counts, rank, world_size) -> splits [W] int64",
            ref_recv_splits, cases_recv_splits,
            "rank r receives from rank i the rows rank i sends to r's experts: sum counts[i, e] over "
            "r's experts e = r*E_local ... (r+1)*E_local - 1 (a column block of counts, not row r)",
            hints={"shape": "one entry per source rank, in rank order: shape [world_size]", "dtype": _INT64},
            wrong_answers=(
                WrongAnswer("the splits are transposed: what this rank sends, not what it receives", _recv_own_row,
                            "row `rank` of counts is what this rank sends; what it receives is in the columns of "
                            "its own experts, one number per source rank"),
                WrongAnswer("expert e is placed on rank e % world_size", _recv_modulo,
                            "rank r holds the consecutive experts r*E_local ... (r+1)*E_local - 1"),
                WrongAnswer("the rows this rank sends to itself are left out", _recv_without_local,
                            "the all-to-all also carries the piece a rank sends to itself: recv_splits[rank] "
                            "counts the rank's own rows for its own experts"),
            ),
        ),
        Question(
            NAME, "local_expert_ids", 2, "local_expert_ids(counts, rank, world_size) -> ids [R] int64",
            ref_local_expert_ids, cases_local_expert_ids,
            "received rows come grouped by source rank, and from each source sorted by expert: for source i = 0, "
            "1, ... repeat local expert e = 0 .. E_local-1 counts[i, rank*E_local + e] times",
            hints={"shape": "one id per received row: R = the sum of this rank's experts' columns of counts",
                   "dtype": _INT64},
            wrong_answers=(
                WrongAnswer("the ids are expert-major (all rows of expert 0 first) instead of source-rank-major",
                            _ids_expert_major,
                            "the rows arrive in source-rank order; only inside one source's piece are they sorted "
                            "by expert. Repeat arange(E_local) once per source rank"),
                WrongAnswer("global expert ids instead of local ones", _ids_global,
                            "return the index into this rank's stacked experts, 0 .. E_local - 1: subtract "
                            "rank * E_local"),
                WrongAnswer("the counts of what this rank sends (row `rank`) are used", _ids_own_row,
                            "what arrives is in the columns of this rank's experts, one row of counts per "
                            "source rank, not in row `rank`"),
            ),
        ),
        Question(
            NAME, "simulate_all_to_all", 2, "simulate_all_to_all(rows, splits) -> received (W tensors)",
            ref_simulate_all_to_all, cases_simulate_all_to_all,
            "cut rows[i] into W consecutive pieces of splits[i, 0], splits[i, 1], ... rows; rank j receives piece "
            "j of every rank i (its own included), concatenated in the order i = 0, 1, ...",
            hints={"type": "return a tuple (or list) of W tensors, one per receiving rank",
                   "shape": "rank j receives splits[:, j].sum() rows: column j of splits, one piece from every "
                            "rank, its own included",
                   "exception": "rank i's rows are cut with row i of splits (rows[i].split(splits[i].tolist())); "
                                "check your loop on the worked example first"},
            wrong_answers=(
                WrongAnswer("each rank's own piece is left out", _a2a_without_local,
                            "piece j of rank j stays on rank j but is part of what it receives, in position j"),
                WrongAnswer("rank j gets its own pieces back (pieces[j][i] instead of pieces[i][j])",
                            _a2a_pieces_swapped,
                            "rank j receives piece j of EVERY rank i = 0, 1, ..., concatenated in that order"),
            ),
        ),
        Question(
            NAME, "combine_back", 2, "combine_back(y_back, slots, weights) -> y [T, d]",
            ref_combine_back, cases_combine_back,
            "row p of y_back is the output for slot slots[p]: put it back there (index_copy into zeros of "
            "shape [T*k, d]; dropped slots stay 0), reshape to [T, k, d], multiply by weights and sum over k",
            hints={"shape": "y has one row per token: [T, d] with T = weights.shape[0]",
                   "dtype": "y has the dtype of y_back: cast the weights with .to(y_back.dtype)",
                   "exception": "y_back has one row per SENT slot, fewer than T*k when slots were dropped, and 0 "
                                "rows on a rank without tokens: scatter into zeros of shape [T*k, d] first, and "
                                "name the sizes (reshape(T, k, d); -1 cannot be inferred from 0 elements)"},
            wrong_answers=(
                WrongAnswer("the rows are used in the order they came back (no inverse permutation)",
                            _combine_in_arrival_order,
                            "y_back is in dispatch order: row p belongs to slot slots[p], so put it back with "
                            "index_copy(0, slots, y_back) before reshaping"),
                WrongAnswer("the routing weights are not applied", _combine_unweighted,
                            "multiply each slot's output by its routing weight before summing over k"),
                WrongAnswer("row p is weighted by the p-th weight instead of its slot's", _combine_weights_in_arrival_order,
                            "the weight of row p is weights.reshape(-1)[slots[p]]: un-permute first, then weight"),
            ),
        ),
        Question(
            NAME, "bytes_per_token", 2,
            "bytes_per_token(k, d, bytes_dispatch, bytes_combine, local_fraction) -> float",
            ref_bytes_per_token, cases_bytes_per_token,
            "k copies of d values go out (bytes_dispatch each) and k results come back (bytes_combine each), "
            "except the fraction local_fraction of the copies whose expert is on the token's own rank",
            hints={"type": "return a Python float (float(...)), not a tensor"},
            wrong_answers=(
                WrongAnswer("the copies that stay local are counted as traffic",
                            lambda k, d, bd, bc, f: float(k * d * (bd + bc)),
                            "multiply by (1 - local_fraction): a copy whose expert is on its own rank never "
                            "crosses the network"),
                WrongAnswer("only the dispatch is counted, not the combine",
                            lambda k, d, bd, bc, f: float(k * d * bd * (1 - f)),
                            "every copy comes back as a result: add the combine's k * d * bytes_combine"),
                WrongAnswer("both directions use the dispatch precision",
                            lambda k, d, bd, bc, f: float(2 * k * d * bd * (1 - f)),
                            "the combine can travel in another precision (DeepSeek-V3: FP8 out, BF16 back): "
                            "use bytes_dispatch + bytes_combine"),
                WrongAnswer("k is left out (one copy per token)",
                            lambda k, d, bd, bc, f: float(d * (bd + bc) * (1 - f)),
                            "a token goes to k experts, so k copies travel"),
                WrongAnswer("local_fraction is used as the fraction that travels",
                            lambda k, d, bd, bc, f: float(k * d * (bd + bc) * f),
                            "local_fraction is what stays on the rank: (1 - local_fraction) of the copies travel"),
            ),
        ),
        Question(
            NAME, "exchange_seconds", 1,
            "exchange_seconds(num_tokens, bytes_per_token, link_gbit_per_s, latency_s) -> float",
            ref_exchange_seconds, cases_exchange_seconds,
            "two all-to-alls (dispatch, combine), each paying latency_s once, plus num_tokens * bytes_per_token "
            "bytes at the link's rate; a link of G Gb/s moves G * 1e9 / 8 bytes per second",
            hints={"type": "return a Python float (seconds), not a tensor"},
            wrong_answers=(
                WrongAnswer("gigabits are taken as gigabytes (the factor 8 is missing)",
                            lambda n, b, g, lat: float(2 * lat + n * b / (g * 1e9)),
                            "links are rated in bits per second: divide by 8 to get bytes (400 Gb/s = 50e9 B/s)"),
                WrongAnswer("a gigabit is taken as 2**30 bits",
                            lambda n, b, g, lat: float(2 * lat + n * b / (g * 2**30 / 8)),
                            "network rates are decimal: 1 Gb/s = 1e9 bits per second"),
                WrongAnswer("the latency is paid once, not per all-to-all",
                            lambda n, b, g, lat: float(lat + n * b / (g * 1e9 / 8)),
                            "dispatch and combine are two all-to-alls: 2 * latency_s"),
                WrongAnswer("the latency is paid per token",
                            lambda n, b, g, lat: float(n * 2 * lat + n * b / (g * 1e9 / 8)),
                            "the latency is paid once per all-to-all, for the whole micro-batch, not per token"),
            ),
        ),
    ],
)

__all__ = ["EXERCISE", "EXAMPLE_INDICES", "EXAMPLE_KEPT", "EXAMPLE_WEIGHTS", "EXAMPLE_COUNTS", "ref_send_splits",
           "ref_dispatch_order", "ref_recv_splits", "ref_local_expert_ids", "ref_simulate_all_to_all",
           "ref_combine_back", "ref_bytes_per_token", "ref_exchange_seconds"]
