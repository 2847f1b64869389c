"""The benchmark CLI's pieces (timings themselves are never asserted in unit tests)."""

from __future__ import annotations

import pytest
import torch

from moe_utils.bench import ROUTINGS, device_slug, make_routing, run_cpu


@pytest.mark.parametrize("mode", ROUTINGS)
def test_bench_routings_pick_k_distinct_experts(mode):
    r = make_routing(mode, T=40, E=8, k=2)
    assert r.indices.shape == (40, 2)
    assert bool((r.indices[:, 0] != r.indices[:, 1]).all())
    torch.testing.assert_close(r.weights.sum(1), torch.ones(40))
    if mode == "balanced":
        assert r.tokens_per_expert().tolist() == [10] * 8
    if mode == "one_hot":
        assert r.tokens_per_expert().tolist() == [40, 40] + [0] * 6


def test_bench_bad_routing_mode_raises():
    with pytest.raises(ValueError, match="mode must be one of"):
        make_routing("skewed", 4, 2, 1)


def test_cpu_bench_rows_have_ratios_and_a_file_safe_device_name():
    rows = run_cpu([{"name": "tiny", "T": 16, "d": 8, "f": 12, "E": 3, "k": 2, "kind": "gelu"}], repeats=1)
    assert {r["backend"] for r in rows} == {"dense", "reference", "torch"}
    for r in rows:
        assert r["fwd_ms"] > 0 and r["fwd_bwd_ms"] > 0 and r["fwd_bwd_time_over_dense"] > 0
    slug = device_slug("cpu")
    assert slug.startswith("cpu") and all(c.isalnum() or c == "-" for c in slug)


def test_lm_step_timing_reports_every_model_and_its_ratio_to_dense():
    from moe_utils.bench import run_lm_steps

    out = run_lm_steps(repeats=1, steps=2)
    assert set(out["ms_per_step"]) == {"dense", "switch", "mixtral"} and out["time_over_dense"]["dense"] == 1.0
    assert all(v > 0 for v in out["ms_per_step"].values())
