"""Training loop: loss goes down, checkpoints resume exactly, routing stats, the cache, the CLI."""

from __future__ import annotations

import math

import pytest
import torch

from moe_utils import monitor
from moe_utils import train as T
from moe_utils.data import CorpusTokens
from moe_utils.model import LMConfig
from moe_utils.routers import Routing

TINY = dict(d_model=32, n_layers=1, n_heads=2, seq_len=32, d_ff=64, num_experts=4)


def tc(**kw):
    base = dict(steps=40, seed=0, batch_size=8, lr=3e-3, warmup_steps=5, eval_every=20, eval_batches=2)
    base.update(kw)
    return T.TrainConfig(**base)


def test_short_training_lowers_the_loss(data):
    result = T.train(LMConfig(ffn="mixtral", **TINY), tc(), data, progress=False)
    h = result.history
    assert h["val_step"] == [0, 20, 40]
    assert h["val_loss"][0] == pytest.approx(math.log(256), abs=0.3)
    assert h["val_loss"][-1] < h["val_loss"][0] - 1.5
    assert sum(h["loss"][-5:]) / 5 < sum(h["loss"][:5]) / 5 - 1.5
    assert len(h["loss"]) == len(h["aux_loss"]) == len(h["routing"]) == 40


def test_training_is_deterministic_per_seed(data):
    cfg = LMConfig(ffn="switch", **TINY)
    a = T.train(cfg, tc(steps=6), data, progress=False).history
    b = T.train(cfg, tc(steps=6), data, progress=False).history
    c = T.train(cfg, tc(steps=6, seed=1), data, progress=False).history
    assert a["loss"] == b["loss"] and a["val_loss"] == b["val_loss"]
    assert a["loss"] != c["loss"]


@pytest.mark.parametrize("ffn", ["switch", "mixtral"])
def test_resume_from_checkpoint_matches_uninterrupted_run(ffn, data, tmp_path):
    cfg = LMConfig(ffn=ffn, **TINY)
    config = tc(steps=12, eval_every=4)
    full = T.train(cfg, config, data, progress=False)

    class Interrupt(Exception):
        pass

    def stop_at_7(step, record):
        if step == 7:
            raise Interrupt  # "killed" after step 7; the last checkpoint is from step 6

    ckpt = tmp_path / "run.pt"
    with pytest.raises(Interrupt):
        T.train(cfg, config, data, checkpoint=ckpt, checkpoint_every=3, progress=False, callback=stop_at_7)
    assert torch.load(ckpt, weights_only=True)["step"] == 6
    resumed = T.train(cfg, config, data, checkpoint=ckpt, checkpoint_every=3, resume=True, progress=False)
    assert resumed.history["loss"] == full.history["loss"]
    assert resumed.history["val_loss"] == full.history["val_loss"]
    for (name, p), q in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(p, q), name
    assert not list(tmp_path.glob("*.tmp*")), "checkpoint write left a temporary file"


def test_resume_refuses_a_checkpoint_of_another_config(data, tmp_path):
    ckpt = tmp_path / "run.pt"
    T.train(LMConfig(ffn="dense", **TINY), tc(steps=2), data, checkpoint=ckpt, progress=False)
    with pytest.raises(ValueError, match="different model or train config"):
        T.train(LMConfig(ffn="switch", **TINY), tc(steps=2), data, checkpoint=ckpt, resume=True, progress=False)


def test_routing_stats_are_logged_every_step(data):
    cfg = LMConfig(ffn="mixtral", **TINY)
    h = T.train(cfg, tc(steps=3), data, progress=False).history
    for step_stats in h["routing"]:
        (s,) = step_stats  # one MoE layer
        assert sum(s["tokens_per_expert"]) == 8 * 32 * 2  # B * S tokens, two choices each
        assert s["dropped_fraction"] == 0.0  # Mixtral is dropless
        assert 0.0 <= s["router_entropy"] <= math.log(4) + 1e-9
        assert s["max_violation"] >= 0.0
    dense = T.train(LMConfig(ffn="dense", **TINY), tc(steps=2), data, progress=False).history
    assert dense["routing"] == [[], []]


def test_learning_rate_warms_up_then_decays_to_the_floor():
    config = T.TrainConfig(steps=100, warmup_steps=10, min_lr_ratio=0.1)
    assert T.lr_at(0, config) == pytest.approx(0.1)
    assert T.lr_at(9, config) == pytest.approx(1.0)
    assert T.lr_at(55, config) == pytest.approx(0.55, abs=0.02)
    assert T.lr_at(100, config) == pytest.approx(0.1)
    assert all(T.lr_at(s, config) >= T.lr_at(s + 1, config) for s in range(10, 100))


def test_bad_training_input_gives_clear_errors(data, tmp_path):
    with pytest.raises(ValueError, match="steps must be an int >= 1, got 0"):
        T.TrainConfig(steps=0)
    with pytest.raises(ValueError, match=r"ffn must be one of \('dense', 'switch', 'mixtral', 'random', 'hash', 'expert_choice', "
                       r"'deepseek', 'bias_balanced'\), got 'moe'"):
        LMConfig(ffn="moe")
    short = CorpusTokens(train=torch.arange(20), validation=torch.arange(20), validation_by_domain={})
    with pytest.raises(ValueError, match="seq_len=32 needs at least 33 tokens"):
        T.train(LMConfig(**TINY), tc(steps=1), short, progress=False)
    with pytest.raises(ValueError, match="resume=True needs a checkpoint"):
        T.train(LMConfig(**TINY), tc(steps=1), data, resume=True, progress=False)
    with pytest.raises(TypeError, match="train_config must be a TrainConfig"):
        T.train(LMConfig(**TINY), 10, data)
    with pytest.raises(TypeError, match="unknown training option"):
        T.load_or_train(LMConfig(**TINY), 1, cache=tmp_path, learning_rate=1.0)


def test_cli_rejects_unknown_model_and_zero_steps(capsys):
    with pytest.raises(SystemExit):
        T.main(["--model", "moe", "--steps", "3"])
    assert "invalid choice: 'moe'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        T.main(["--model", "dense", "--steps", "0"])
    assert "steps must be an int >= 1" in capsys.readouterr().err


def test_load_or_train_trains_once_then_loads(data, tmp_path, monkeypatch):
    monkeypatch.setattr(T, "corpus_tokens", lambda: data)
    cfg = LMConfig(ffn="switch", **TINY)
    first = T.load_or_train(cfg, 3, seed=0, cache=tmp_path, progress=False, batch_size=4, eval_batches=1)
    path = T.trained_model_path(cfg, first.train_config, tmp_path)
    assert path.exists() and path.parent.parent == tmp_path

    def no_training(*args, **kwargs):
        raise AssertionError("load_or_train trained again although the model was cached")

    monkeypatch.setattr(T, "train", no_training)
    second = T.load_or_train(cfg, 3, seed=0, cache=tmp_path, progress=False, batch_size=4, eval_batches=1)
    assert second.history == first.history
    for p, q in zip(first.model.state_dict().values(), second.model.state_dict().values()):
        assert torch.equal(p, q)


def test_monitor_metrics_on_known_loads():
    assert monitor.max_violation(torch.tensor([2, 2, 2, 2])) == 0.0
    assert monitor.max_violation(torch.tensor([8, 0, 0, 0])) == 3.0  # total collapse: E - 1
    assert monitor.max_violation([3, 1, 0, 0]) == pytest.approx(2.0)
    # a tenth of a fair share is 1/40 of the tokens: 0 is dead, 1/21 is not, 1/81 is
    assert monitor.dead_experts([10, 10, 0, 1]) == 1
    assert monitor.dead_experts([40, 40, 0, 1]) == 2
    assert monitor.dead_experts([10, 10, 10, 10]) == 0
    uniform = torch.full((5, 4), 0.25)
    assert monitor.router_entropy(uniform) == pytest.approx(math.log(4))
    assert monitor.router_entropy(torch.eye(4)) == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(ValueError, match="load must be a non-empty 1-D"):
        monitor.max_violation(torch.zeros(2, 2))
    r = Routing.fixed(torch.tensor([[0], [0], [1], [0]]), torch.ones(4, 1), num_experts=4)
    s = monitor.routing_stats(r)
    assert s["tokens_per_expert"] == [3, 1, 0, 0] and s["dead_experts"] == 2 and s["dropped_fraction"] == 0.0
    assert s["router_entropy"] is None


def test_train_many_in_worker_processes_equals_train_here_bit_for_bit(data, tmp_path):
    jobs = {
        "switch": (LMConfig(ffn="switch", **TINY), tc(steps=6, eval_every=3)),
        "dense": (LMConfig(ffn="dense", **TINY), tc(steps=6, eval_every=3, seed=1)),
    }
    lines = []
    got = T.train_many(jobs, data, workers=2, report=lines.append)
    assert list(got) == ["switch", "dense"] and len(lines) == 2
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # what each worker uses
    try:
        for name, (cfg, t) in jobs.items():
            want = T.train(cfg, t, data, progress=False)
            assert got[name].history["loss"] == want.history["loss"]
            for (k, a), b in zip(got[name].model.state_dict().items(), want.model.state_dict().values()):
                assert torch.equal(a, b), k
    finally:
        torch.set_num_threads(threads)


def test_train_many_uses_the_cache_and_rejects_bad_jobs(tmp_path, monkeypatch):
    monkeypatch.setenv("MOE_CACHE", str(tmp_path))
    cfg, t = LMConfig(ffn="dense", **TINY), tc(steps=3, eval_every=3)
    stored = T.TrainResult(T.TinyLM(cfg), cfg, t, {"val_loss": [9.0], "val_step": [3]})
    T.save_trained(stored)  # pretend an earlier run trained it
    lines = []
    got = T.train_many({"a": (cfg, t)}, report=lines.append)
    assert got["a"].final_val_loss == 9.0 and "loaded from the cache" in lines[0]
    with pytest.raises(TypeError, match="jobs"):
        T.train_many([(cfg, t)])
    with pytest.raises(TypeError, match=r"jobs\['b'\]"):
        T.train_many({"b": cfg})
    with pytest.raises(ValueError, match="workers"):
        T.train_many({"a": (cfg, t)}, workers=0)


def test_evaluate_stream_is_the_mean_over_every_window_of_the_stream(data):
    torch.manual_seed(0)
    model = T.TinyLM(LMConfig(ffn="mixtral", **TINY))
    stream = data.validation[:32 * 7 + 5]  # 7 full windows of 32, and 4 tokens left over
    got = T.evaluate_stream(model, stream, batch_size=3)  # batches of 3, 3 and 1 windows
    model.eval()
    losses = []
    with torch.no_grad():
        for i in range(7):
            x, y = stream[i * 32:(i + 1) * 32], stream[i * 32 + 1:(i + 1) * 32 + 1]
            logp = torch.log_softmax(model(x[None]).logits[0].double(), -1)
            losses += [-logp[t, y[t]].item() for t in range(32)]
    assert got == pytest.approx(sum(losses) / len(losses), rel=1e-5)
    with pytest.raises(ValueError, match="seq_len"):
        T.evaluate_stream(model, stream[:10])


def test_a_finished_run_records_the_full_validation_loss(data):
    r = T.train(LMConfig(ffn="dense", **TINY), tc(steps=4, eval_every=2), data, progress=False)
    assert r.full_val_loss == pytest.approx(T.evaluate_stream(r.model, data.validation), rel=1e-6)


def test_train_many_in_this_process_also_uses_one_thread(data, monkeypatch):
    # the in-process path (one job) must compute what a worker computes, so results never
    # depend on how many jobs ran together
    seen = []
    real = T.train

    def spy(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return real(*args, **kwargs)

    monkeypatch.setattr(T, "train", spy)
    threads = torch.get_num_threads()
    T.train_many({"one": (LMConfig(ffn="dense", **TINY), tc(steps=2, eval_every=2))}, data, report=None)
    assert seen == [1] and torch.get_num_threads() == threads
