"""ex08_routing_security: the statistics, the attack arithmetic and the monitor score of
notebook 08 (consecutive-token repetition, its chance rate, mutual information in bits,
the size of a capacity-overflow flood, the anomaly score, and ROC AUC)."""

from __future__ import annotations

import math
from fractions import Fraction

import torch

from ..spec import Case, Exercise, Question, Rand, WrongAnswer, randint, randn

NAME = "ex08_routing_security"
F64 = torch.float64


# -- references: written here from the maths, independent of the rest of moe_utils ----------


def ref_consecutive_same_expert_rate(experts):
    N, S = experts.shape
    same = 0
    for n in range(N):
        row = experts[n].tolist()
        same += sum(a == b for a, b in zip(row[:-1], row[1:]))
    return same / (N * (S - 1))


def ref_load_chance_rate(experts, num_experts):
    counts = [0] * num_experts
    for e in experts.reshape(-1).tolist():
        counts[e] += 1
    total = sum(counts)
    return sum((c / total) ** 2 for c in counts)


def ref_mutual_information_bits(x, y, nx, ny):
    n = x.numel()
    joint, px, py = {}, [0] * nx, [0] * ny
    for a, b in zip(x.tolist(), y.tolist()):
        joint[a, b] = joint.get((a, b), 0) + 1
        px[a] += 1
        py[b] += 1
    return sum(c / n * math.log2(c * n / (px[a] * py[b])) for (a, b), c in joint.items())


def ref_flood_sequences_needed(group_tokens, num_experts, capacity_factor, per_sequence, min_capacity=4):
    capacity = max(min_capacity, math.floor(Fraction(str(capacity_factor)) * group_tokens / num_experts))
    return -(-capacity // per_sequence)  # ceil


def ref_anomaly_score(features, mean, sd, two_sided, sd_floor=0.01):
    best = -math.inf
    for f, m, s, two in zip(features.tolist(), mean.tolist(), sd.tolist(), two_sided.tolist()):
        z = (f - m) / max(s, sd_floor)
        best = max(best, abs(z) if two else z)
    return best


def ref_roc_auc(benign, attack):
    wins = 0.0
    for a in attack.tolist():
        for b in benign.tolist():
            wins += 1.0 if a > b else 0.5 if a == b else 0.0
    return wins / (attack.numel() * benign.numel())


# -- the mistakes students make, as code -------------------------------------------------------


def _rate_across_windows(experts):
    flat = experts.reshape(-1)
    return float((flat[1:] == flat[:-1]).double().mean())


def _rate_over_all_tokens(experts):
    return float((experts[:, 1:] == experts[:, :-1]).double().sum()) / experts.numel()


def _rate_with_wraparound(experts):
    return float((experts == torch.roll(experts, 1, dims=1)).double().mean())


def _mi_nats(x, y, nx, ny):
    return ref_mutual_information_bits(x, y, nx, ny) * math.log(2)


def _mi_unweighted(x, y, nx, ny):
    n = x.numel()
    joint, px, py = {}, [0] * nx, [0] * ny
    for a, b in zip(x.tolist(), y.tolist()):
        joint[a, b] = joint.get((a, b), 0) + 1
        px[a] += 1
        py[b] += 1
    return sum(math.log2(c * n / (px[a] * py[b])) for (a, b), c in joint.items()) / len(joint)


def _mi_over_h_y(x, y, nx, ny):
    py = torch.bincount(y, minlength=ny).double() / y.numel()
    py = py[py > 0]
    return ref_mutual_information_bits(x, y, nx, ny) / float(-(py * py.log2()).sum())


# -- cases ------------------------------------------------------------------------------------


def _runs(r: Rand, N: int, S: int, E: int) -> torch.Tensor:
    """[N, S] expert ids with runs of equal experts, as trained routers produce."""
    out = torch.empty(N, S, dtype=torch.int64)
    for n in range(N):
        cur = r.integer(0, E - 1)
        for s in range(S):
            if r.integer(0, 2) == 0:
                cur = r.integer(0, E - 1)
            out[n, s] = cur
    return out


def cases_consecutive_same_expert_rate(h: Rand) -> list[Case]:
    return [
        Case("hand-worked: [[0, 0, 1, 1, 1], [2, 3, 2, 3, 3]] has 4 repeats in 8 pairs",
             (torch.tensor([[0, 0, 1, 1, 1], [2, 3, 2, 3, 3]]),), expected=0.5),
        Case("two windows whose boundary repeats: [[1, 2], [2, 3]] (no pair crosses windows)",
             (torch.tensor([[1, 2], [2, 3]]),), expected=0.0,
             hint="pairs are (t, t+1) inside one window: the last token of a window and the first of the "
                  "next are not neighbours"),
        Case("random runs, N=4 S=16 E=8", (_runs(Rand(81), 4, 16, 8),)),
        Case("one window, S=2, same expert", (torch.tensor([[5, 5]]),), expected=1.0, public=False),
        Case("random runs, N=7 S=9 E=4", (_runs(h, 7, 9, 4),), public=False),
        Case("uniform random, N=3 S=33 E=8", (h.randint(8, 3, 33),), public=False),
        Case("every window one expert, last differs from next first", (torch.arange(6)[:, None].repeat(1, 5),),
             public=False),
    ]


def cases_load_chance_rate(h: Rand) -> list[Case]:
    return [
        Case("hand-worked: shares [0.5, 0.25, 0.25, 0] give 0.375",
             (torch.tensor([[0, 0, 1, 2]]), 4), expected=0.375),
        Case("perfect balance gives 1/E, E=4", (torch.arange(8).reshape(2, 4) % 4, 4), expected=0.25),
        Case("random, N=3 S=10 E=8", (randint(82, 8, 3, 10), 8)),
        Case("total collapse gives 1", (torch.zeros(2, 6, dtype=torch.int64), 5), public=False),
        Case("random runs, N=5 S=12 E=6", (_runs(h, 5, 12, 6), 6), public=False),
        Case("an expert nobody used, E=8", (h.randint(3, 4, 7), 8), public=False),
    ]


def _mi_case(r: Rand, n: int, nx: int, ny: int):
    x = r.randint(nx, n)
    y = (x * 2 + r.randint(2, n)) % ny  # y depends on x, with noise
    return x, y


def cases_mutual_information_bits(h: Rand) -> list[Case]:
    x = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    y = torch.tensor([0, 0, 0, 1, 1, 1, 1, 0])
    h14 = -(0.25 * math.log2(0.25) + 0.75 * math.log2(0.75))
    pub = _mi_case(Rand(83), 60, 3, 5)
    hid = _mi_case(h, 200, 4, 7)
    xi = torch.arange(4).repeat(4)
    return [
        Case("hand-worked: joint counts [[3, 1], [1, 3]] give 1 - H(1/4) bits", (x, y, 2, 2),
             expected=1 - h14, atol=1e-9),
        Case("y = x, 4 equally likely values: 2 bits", (torch.arange(4).repeat(3), torch.arange(4).repeat(3), 4, 4),
             expected=2.0, atol=1e-9),
        Case("every (x, y) pair once: independent, 0 bits", (xi, torch.arange(4).repeat_interleave(4), 4, 4),
             expected=0.0, atol=1e-9),
        Case("random dependent labels, n=60, nx=3 ny=5", (*pub, 3, 5), atol=1e-9),
        Case("labels that never occur (nx=6, ny=9): empty cells must not give NaN", (*pub, 6, 9), public=False,
             atol=1e-9),
        Case("random dependent labels, n=200, nx=4 ny=7", (*hid, 4, 7), public=False, atol=1e-9),
        Case("one value of x only: 0 bits", (torch.zeros(10, dtype=torch.int64), h.randint(3, 10), 1, 3),
             public=False, atol=1e-9),
    ]


def cases_flood_sequences_needed(h: Rand) -> list[Case]:
    T = h.pick([256, 512, 1024])
    return [
        Case("notebook 08: T=512, E=8, CF=2.0, 63 tokens per sequence: C=128 needs 3", (512, 8, 2.0, 63),
             expected=3),
        Case("exactly full: T=512, E=8, CF=2.0, 64 per sequence", (512, 8, 2.0, 64), expected=2),
        Case("min_capacity wins: T=16, E=8, CF=1.0 (C = max(4, 2) = 4), 3 per sequence", (16, 8, 1.0, 3),
             expected=2),
        Case("CF=1.25 exactly on an integer: T=64, E=8 gives C=10, 5 per sequence", (64, 8, 1.25, 5), expected=2,
             public=False),
        Case("min_capacity=0, T=10, E=4, CF=1.0 (C=2), 7 per sequence", (10, 4, 1.0, 7), {"min_capacity": 0},
             expected=1, public=False),
        Case("random group", (T, h.pick([4, 8, 16]), h.pick([1.0, 1.25, 2.0, 3.0]), h.integer(1, 64)),
             public=False),
        Case("CF=0.1 on a tiny group: min_capacity 4 decides", (20, 4, 0.1, 1), public=False),
    ]


def _features(r: Rand, F: int):
    mean = r.randn(F, dtype=F64)
    sd = r.randn(F, dtype=F64).abs() * 0.5 + 0.02
    feats = mean + sd * r.randn(F, dtype=F64, scale=2.0)
    two = r.randint(2, F).bool()
    return feats, mean, sd, two


def cases_anomaly_score(h: Rand) -> list[Case]:
    f = torch.tensor([0.3, 0.1, 0.9], dtype=F64)
    m = torch.tensor([0.1, 0.2, 0.5], dtype=F64)
    s = torch.tensor([0.1, 0.05, 0.001], dtype=F64)
    return [
        Case("hand-worked: z = 2, -2, 40 (sd floored to 0.01): score 40",
             (f, m, s, torch.tensor([False, True, False])), expected=40.0, atol=1e-9),
        Case("a one-sided feature far BELOW its mean is not suspicious",
             (torch.tensor([0.0, 0.5], dtype=F64), torch.tensor([1.0, 0.5], dtype=F64),
              torch.tensor([0.1, 0.1], dtype=F64), torch.tensor([False, False])), expected=0.0, atol=1e-9,
             hint="one-sided features count only deviations upwards (more drops, more concentration)"),
        Case("random, 12 features", _features(Rand(84), 12), atol=1e-9),
        Case("custom sd_floor = 0.5", _features(Rand(85), 6), {"sd_floor": 0.5}, atol=1e-9),
        Case("two-sided feature far below its mean", (torch.tensor([0.0], dtype=F64), torch.tensor([1.0], dtype=F64),
                                                      torch.tensor([0.1], dtype=F64), torch.tensor([True])),
             expected=10.0, atol=1e-9, public=False),
        Case("random, 30 features", _features(h, 30), public=False, atol=1e-9),
        Case("every sd below the floor", (*_features(h, 5)[:2], torch.full((5,), 1e-6, dtype=F64),
                                          torch.ones(5, dtype=torch.bool)), public=False, atol=1e-6),
    ]


def cases_roc_auc(h: Rand) -> list[Case]:
    return [
        Case("hand-worked: 8 of 12 pairs ranked right", (torch.tensor([0.1, 0.4, 0.35, 0.8], dtype=F64),
                                                        torch.tensor([0.9, 0.3, 0.6], dtype=F64)),
             expected=8 / 12, atol=1e-12),
        Case("ties count one half: identical scores give 0.5", (torch.full((4,), 0.5, dtype=F64),
                                                                torch.full((3,), 0.5, dtype=F64)),
             expected=0.5, atol=1e-12),
        Case("random scores with ties", (randn(86, 20, dtype=F64).round(decimals=1),
                                         (randn(87, 15, dtype=F64) + 1).round(decimals=1)), atol=1e-12),
        Case("perfect separation gives 1", (h.randn(10, dtype=F64), h.randn(7, dtype=F64) + 100.0),
             expected=1.0, public=False, atol=1e-12),
        Case("attack scores below benign give 0", (h.randn(6, dtype=F64) + 100.0, h.randn(9, dtype=F64)),
             expected=0.0, public=False, atol=1e-12),
        Case("random, many ties", (h.randint(4, 30).double(), h.randint(5, 25).double()), public=False, atol=1e-12),
    ]


_FLOAT = "return a Python float (float(...) of a 0-dim tensor)"

EXERCISE = Exercise(
    name=NAME,
    title="Routing statistics, the overflow attack and the monitor's score",
    lecture="08_routing_analysis",
    questions=[
        Question(
            NAME, "consecutive_same_expert_rate", 2, "consecutive_same_expert_rate(experts) -> float",
            ref_consecutive_same_expert_rate, cases_consecutive_same_expert_rate,
            "compare experts[:, 1:] with experts[:, :-1]: N * (S - 1) pairs, none across windows",
            hints={"type": _FLOAT},
            wrong_answers=(
                WrongAnswer("pairs across window boundaries are counted (the windows were flattened)",
                            _rate_across_windows,
                            "keep the [N, S] layout: the last token of one window is not the neighbour of the first "
                            "token of the next"),
                WrongAnswer("the count is divided by the number of tokens instead of the number of pairs",
                            _rate_over_all_tokens, "a window of S tokens has S - 1 consecutive pairs"),
                WrongAnswer("torch.roll wraps the last token of a window around to its first",
                            _rate_with_wraparound, "slice (experts[:, 1:] vs experts[:, :-1]) instead of rolling"),
            ),
        ),
        Question(
            NAME, "load_chance_rate", 1, "load_chance_rate(experts, num_experts) -> float",
            ref_load_chance_rate, cases_load_chance_rate,
            "share_e = fraction of all tokens on expert e; the rate is sum_e share_e ** 2",
            hints={"type": _FLOAT},
            wrong_answers=(
                WrongAnswer("1 / num_experts, the rate of a balanced router",
                            lambda experts, num_experts: 1.0 / num_experts,
                            "use the experts' actual shares: an unbalanced router repeats more by chance"),
            ),
        ),
        Question(
            NAME, "mutual_information_bits", 3, "mutual_information_bits(x, y, nx, ny) -> float",
            ref_mutual_information_bits, cases_mutual_information_bits,
            "I = sum over (a, b) with count > 0 of p(a, b) * log2(p(a, b) / (p(a) p(b))), from the counts",
            hints={"type": _FLOAT,
                   "nan": "0 * log(0) is NaN in torch: sum only over cells with a count > 0 (or mask them)"},
            wrong_answers=(
                WrongAnswer("natural logarithm (nats) instead of log2 (bits)", _mi_nats,
                            "bits: use torch.log2 (or divide the natural log by ln 2)"),
                WrongAnswer("the log-ratios are averaged over cells instead of weighted by p(a, b)", _mi_unweighted,
                            "each cell's log2(p(a, b) / (p(a) p(b))) is weighted by p(a, b)"),
                WrongAnswer("the result is divided by H(y)", _mi_over_h_y,
                            "return the mutual information itself, in bits, not a normalised version"),
            ),
        ),
        Question(
            NAME, "flood_sequences_needed", 2,
            "flood_sequences_needed(group_tokens, num_experts, capacity_factor, per_sequence, min_capacity=4) -> int",
            ref_flood_sequences_needed, cases_flood_sequences_needed,
            "C = max(min_capacity, floor(capacity_factor * group_tokens / num_experts)); the attacker needs "
            "ceil(C / per_sequence) sequences",
            hints={"type": "return a Python int (math.ceil and math.floor give ints)"},
            wrong_answers=(
                WrongAnswer("the number of sequences is rounded down",
                            lambda T, E, cf, n, min_capacity=4: max(min_capacity, math.floor(cf * T / E)) // n,
                            "a partly filled buffer drops nothing: round the number of sequences up (math.ceil)"),
                WrongAnswer("min_capacity is ignored",
                            lambda T, E, cf, n, min_capacity=4: math.ceil(math.floor(cf * T / E) / n),
                            "the capacity is never below min_capacity"),
                WrongAnswer("the capacity factor is left out (C = T / E)",
                            lambda T, E, cf, n, min_capacity=4: math.ceil(max(min_capacity, T // E) / n),
                            "C = floor(capacity_factor * T / E): the buffers hold capacity_factor times a fair share"),
            ),
        ),
        Question(
            NAME, "anomaly_score", 2, "anomaly_score(features, mean, sd, two_sided, sd_floor=0.01) -> float",
            ref_anomaly_score, cases_anomaly_score,
            "z_i = (features_i - mean_i) / max(sd_i, sd_floor); |z_i| where two_sided_i; the score is the largest z_i",
            hints={"type": _FLOAT},
            wrong_answers=(
                WrongAnswer("every feature is treated as two-sided",
                            lambda f, m, s, t, sd_floor=0.01: float(((f - m) / s.clamp_min(sd_floor)).abs().max()),
                            "take |z| only where two_sided is True: fewer drops than usual is not an attack"),
                WrongAnswer("the sd floor is missing",
                            lambda f, m, s, t, sd_floor=0.01: float(torch.where(t, ((f - m) / s).abs(),
                                                                                (f - m) / s).max()),
                            "divide by max(sd, sd_floor): a feature that never moved on benign traffic (sd near 0) "
                            "would make any tiny change look infinitely anomalous"),
                WrongAnswer("the mean of the z values instead of the largest",
                            lambda f, m, s, t, sd_floor=0.01: float(torch.where(t, ((f - m) / s.clamp_min(sd_floor))
                                                                                .abs(), (f - m) / s.clamp_min(sd_floor))
                                                                    .mean()),
                            "one feature far off is enough: the score is the maximum over the features"),
            ),
        ),
        Question(
            NAME, "roc_auc", 2, "roc_auc(benign, attack) -> float",
            ref_roc_auc, cases_roc_auc,
            "the share of (attack, benign) pairs where the attack scores higher, ties counting one half",
            hints={"type": _FLOAT},
            wrong_answers=(
                WrongAnswer("ties count as 0",
                            lambda b, a: float((a[:, None] > b[None, :]).double().mean()),
                            "a tie is a coin flip for the detector: it counts one half"),
                WrongAnswer("ties count as 1",
                            lambda b, a: float((a[:, None] >= b[None, :]).double().mean()),
                            "a tie is a coin flip for the detector: it counts one half"),
                WrongAnswer("benign and attack are swapped (1 - AUC)",
                            lambda b, a: 1.0 - ref_roc_auc(b, a),
                            "count the pairs where the *attack* score is higher than the benign one"),
            ),
        ),
    ],
)

__all__ = [
    "EXERCISE",
    "ref_consecutive_same_expert_rate",
    "ref_load_chance_rate",
    "ref_mutual_information_bits",
    "ref_flood_sequences_needed",
    "ref_anomaly_score",
    "ref_roc_auc",
]
