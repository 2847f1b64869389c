"""Smoke tests for moe_utils.viz: every plot draws on the Agg backend and returns its Axes."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from moe_utils import viz  # noqa: E402


def test_plot_expert_load_draws_one_line_per_expert_plus_uniform():
    fig, ax = plt.subplots()
    load = torch.randint(0, 50, (10, 4))
    out = viz.plot_expert_load(load, steps=torch.arange(0, 100, 10), ax=ax)
    assert out is ax and len(ax.lines) == 4 + 1
    plt.close(fig)


def test_plot_expert_load_rejects_wrong_steps():
    with pytest.raises(ValueError, match="steps"):
        viz.plot_expert_load(torch.ones(5, 3), steps=[0, 1])
    plt.close("all")


def test_plot_routing_heatmap_and_drop_rate_and_loss_curves():
    fig, axes = plt.subplots(1, 3)
    viz.plot_routing_heatmap(torch.rand(3, 4), ax=axes[0], row_labels=["a", "b", "c"], annotate=True)
    viz.plot_drop_rate([1.0, 1.5, 2.0], {"G=64": [0.2, 0.1, 0.05], "G=2048": [0.1, 0.02, 0.0]}, ax=axes[1])
    viz.plot_loss_curves({"aux 0": [3.0, 2.0, 1.5, 1.2], "aux 0.01": [3.0, 2.1, 1.4, 1.1]}, ax=axes[2], smooth=2)
    assert len(axes[0].images) == 1
    assert len(axes[1].lines) == 2 and len(axes[2].lines) == 2
    plt.close(fig)


def test_plot_expert_counts_draws_one_bar_per_expert():
    fig, ax = plt.subplots()
    viz.plot_expert_counts(torch.tensor([5, 3, 0, 8]), ax=ax, expected=4.0)
    assert len(ax.patches) == 4 and len(ax.lines) == 1
    plt.close(fig)
