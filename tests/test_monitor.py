"""The routing monitor (moe_utils.monitor): traces, features on hand-worked batches, the
detector's verdicts and its error handling, and ROC/AUC computed two independent ways."""

from __future__ import annotations

import pytest
import torch

from moe_utils.model import LMConfig, TinyLM
from moe_utils.monitor import (
    RoutingAnomalyDetector,
    RoutingTrace,
    Verdict,
    batch_features,
    roc_auc,
    roc_curve,
    sequence_features,
)


def _trace(indices, E=4, kept=None, probs=None):
    idx = [torch.as_tensor(i)[..., None] if torch.as_tensor(i).dim() == 2 else torch.as_tensor(i) for i in indices]
    return RoutingTrace(idx, E, probs, kept)


def _random_traces(n, B=4, S=16, E=4, L=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [_trace([torch.randint(0, E, (B, S), generator=g) for _ in range(L)], E) for _ in range(n)]


# ---------------------------------------------------------------- traces


def test_trace_rejects_empty_batches_and_bad_shapes():
    with pytest.raises(ValueError, match="empty batch"):
        RoutingTrace([torch.zeros(0, 8, 1, dtype=torch.long)], 4)
    with pytest.raises(ValueError, match="empty batch"):
        RoutingTrace([torch.zeros(2, 0, 1, dtype=torch.long)], 4)
    with pytest.raises(TypeError, match="non-empty list"):
        RoutingTrace([], 4)
    with pytest.raises(ValueError, match="same"):
        RoutingTrace([torch.zeros(2, 8, 1, dtype=torch.long), torch.zeros(3, 8, 1, dtype=torch.long)], 4)
    with pytest.raises(ValueError, match=r"expert ids in \[0, 3\]"):
        RoutingTrace([torch.full((2, 8, 1), 4)], 4)
    with pytest.raises(ValueError, match="probs"):
        RoutingTrace([torch.zeros(2, 8, 1, dtype=torch.long)], 4, probs=[torch.zeros(2, 8, 3)])
    with pytest.raises(ValueError, match="empty batch"):
        RoutingTrace.from_router_logits([torch.zeros(0, 4)], batch_size=1, k=1)


def test_trace_from_a_tinylm_and_from_hf_style_logits_agree():
    torch.manual_seed(0)
    cfg = LMConfig(ffn="mixtral", d_model=16, n_layers=2, n_heads=2, seq_len=8, d_ff=16, num_experts=4)
    model = TinyLM(cfg).eval()
    out = model(torch.randint(0, 256, (3, 8)))
    t = RoutingTrace.from_routings(out.routings, 3)
    assert (t.num_layers, t.batch_size, t.seq_len, t.num_experts) == (2, 3, 8, 4)
    h = RoutingTrace.from_router_logits([r.logits for r in out.routings], 3, k=2)
    for a, b in zip(t.indices, h.indices):
        assert torch.equal(a, b)
    assert torch.allclose(h.probs[0].sum(-1), torch.ones(3, 8, dtype=torch.float64))
    assert h.kept is None and t.kept is not None
    with pytest.raises(ValueError, match="batch_size"):
        RoutingTrace.from_router_logits([r.logits for r in out.routings], 5, k=2)


# ---------------------------------------------------------------- features


def test_batch_features_hand_worked():
    layer0 = torch.tensor([[0, 0, 0, 1], [2, 3, 2, 3]])  # B = 2, S = 4, E = 4
    kept = [torch.tensor([[True, True, False, True], [True, True, True, True]])[..., None]]
    f = batch_features(_trace([layer0], kept=kept))
    assert [f[f"L0 load share e{e}"] for e in range(4)] == [3 / 8, 1 / 8, 2 / 8, 2 / 8]
    assert f["L0 busiest expert share"] == 3 / 8
    assert f["L0 most concentrated sequence"] == 3 / 4
    assert f["L0 consecutive same expert"] == pytest.approx((2 / 3 + 0 / 3) / 2)
    assert f["L0 dropped fraction"] == 1 / 8
    assert "L0 router entropy" not in f


def test_sequence_features_hand_worked_with_entropy():
    layer0 = torch.tensor([[1, 1, 1, 1], [0, 1, 2, 3]])
    probs = [torch.tensor([0.25, 0.25, 0.25, 0.25], dtype=torch.float64).expand(2, 4, 4)]
    rows = sequence_features(_trace([layer0], probs=probs))
    assert rows[0]["L0 busiest expert share"] == 1.0 and rows[1]["L0 busiest expert share"] == 0.25
    assert rows[0]["L0 consecutive same expert"] == 1.0 and rows[1]["L0 consecutive same expert"] == 0.0
    assert rows[0]["L0 router entropy"] == pytest.approx(torch.log(torch.tensor(4.0)).item())


# ---------------------------------------------------------------- detector


def test_detector_flags_a_concentrated_batch_and_says_why():
    det = RoutingAnomalyDetector(fpr=0.05).fit(_random_traces(30), _random_traces(30, seed=1))
    flood = _random_traces(1, seed=2)[0]
    flood.indices[1][:3] = 2  # three of four sequences: every token to expert 2 in layer 1
    v = det.check(flood)
    assert isinstance(v, Verdict) and v.anomalous and v.score > det.threshold
    assert any("L1" in r and ("e2" in r or "busiest" in r or "concentrated" in r) for r in v.reasons)
    assert "ANOMALOUS" in str(v)
    held_out = [det.check(t).anomalous for t in _random_traces(40, seed=3)]
    assert sum(held_out) <= 6  # about fpr of benign batches flagged, not most of them


def test_detector_scores_sequences_of_any_batch_size():
    det = RoutingAnomalyDetector(fpr=0.05).fit(_random_traces(30))
    trace = _random_traces(1, B=2, seed=5)[0]
    trace.indices[0][1] = 3  # the second sequence: all on expert 3
    verdicts = det.check_sequences(trace)
    assert len(verdicts) == 2 and verdicts[1].anomalous and verdicts[1].score > verdicts[0].score
    assert len(det.sequence_scores(trace)) == 2


def test_detector_errors_are_clear():
    det = RoutingAnomalyDetector()
    trace = _random_traces(1)[0]
    with pytest.raises(RuntimeError, match="not fitted.*fit"):
        det.check(trace)
    with pytest.raises(RuntimeError, match="not fitted"):
        det.check_sequences(trace)
    with pytest.raises(ValueError, match="at least 2"):
        det.fit(_random_traces(1))
    det.fit(_random_traces(10))
    with pytest.raises(ValueError, match="num_experts=8.*num_experts=4"):
        det.check(_random_traces(1, E=8)[0])
    with pytest.raises(ValueError, match="3 MoE layers"):
        det.check(_random_traces(1, L=3)[0])
    with pytest.raises(ValueError, match="batches of 4"):
        det.check(_random_traces(1, B=3)[0])
    with pytest.raises(TypeError, match="RoutingTrace"):
        det.check(torch.zeros(4, 16, dtype=torch.long))
    with_drops = _trace([torch.zeros(4, 16, dtype=torch.long)] * 2, kept=[torch.ones(4, 16, 1, dtype=torch.bool)] * 2)
    with pytest.raises(ValueError, match="features differ"):
        det.check(with_drops)
    with pytest.raises(ValueError, match="same num_experts"):
        RoutingAnomalyDetector().fit(_random_traces(3) + _random_traces(1, E=8))
    with pytest.raises(ValueError, match="fpr"):
        RoutingAnomalyDetector(fpr=1.0)


# ---------------------------------------------------------------- ROC


def _auc_trapezoid(benign, attack):
    fpr, tpr, _ = roc_curve(benign, attack)
    return float(torch.trapezoid(tpr, fpr))


def test_roc_auc_agrees_with_the_area_under_roc_curve():
    g = torch.Generator().manual_seed(0)
    benign = torch.randn(40, generator=g).round(decimals=1)  # rounding makes ties
    attack = (torch.randn(30, generator=g) + 1).round(decimals=1)
    assert roc_auc(benign, attack) == pytest.approx(_auc_trapezoid(benign, attack), abs=1e-12)


def test_roc_extremes_and_endpoints():
    assert roc_auc([0.1, 0.2], [0.3, 0.9]) == 1.0
    assert roc_auc([0.3, 0.9], [0.1, 0.2]) == 0.0
    assert roc_auc([0.5, 0.5], [0.5]) == 0.5
    fpr, tpr, th = roc_curve([0.1, 0.4, 0.35, 0.8], [0.9, 0.3, 0.6])
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0.0, 0.0, 1.0, 1.0)
    assert bool((fpr[1:] >= fpr[:-1]).all() and (tpr[1:] >= tpr[:-1]).all())
    # hand-worked: pairs (attack > benign) = 4 + 1 + 3 = 8 of 12
    assert roc_auc([0.1, 0.4, 0.35, 0.8], [0.9, 0.3, 0.6]) == pytest.approx(8 / 12)
    with pytest.raises(ValueError, match="benign_scores"):
        roc_auc([], [1.0])
    with pytest.raises(ValueError, match="finite"):
        roc_auc([float("nan")], [1.0])
