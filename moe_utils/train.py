"""Training loop for ``TinyLM``: AdamW, warm-up + cosine decay, MoE losses, routing stats,
periodic validation, atomic checkpoints that resume bit-for-bit on CPU.

The loss that is minimised::

    loss = cross_entropy + aux_loss + z_loss        # aux and z already carry their coefficients

Each step logs the cross-entropy, both router losses, the learning rate and, for
every MoE layer, ``moe_utils.monitor.routing_stats`` (tokens per expert, dropped
fraction, MaxVio, dead experts, router entropy). Every ``eval_every`` steps (and
at step 0 and at the end) the mean cross-entropy on a fixed set of validation
windows is logged, the same windows for every model, so curves are comparable.

Reproducibility: one seed fixes the initial weights (global torch RNG), the
training batches (their own ``torch.Generator``) and the Switch jitter (global
RNG). A checkpoint stores the model, optimizer, scheduler, both RNG states, the
step and the history; resuming from it gives exactly the losses of an
uninterrupted run on the same machine.

From the shell::

    python -m moe_utils.train --model switch --steps 300 --seed 0 --checkpoint run.pt
    python -m moe_utils.train --model switch --steps 300 --seed 0 --checkpoint run.pt --resume

From a notebook, ``load_or_train(config, steps, seed)`` returns a trained model
from the cache folder (training and storing it the first time).

After every ``optimizer.step()`` the loop calls ``model.after_optimizer_step()``, outside
autograd: routers with state that is not learned by gradient update it there
(``BiasBalancedRouter``'s bias); for every other model it does nothing.

Continued training (notebook 09's sparse upcycling): ``train(..., init_state=state)``
starts from given weights instead of a fresh initialisation; ``TrainConfig.init_from``
must then hold ``state_digest(state)``, so that the cache key covers the starting point.
``continue_training(config, state, steps, seed)`` builds such a job.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ._checks import check_positive_float, check_positive_int
from .data import CORPUS_VERSION, CorpusTokens, cache_dir, corpus_tokens, fixed_batches, get_batch
from .model import ALL_FFN_KINDS, LMConfig, TinyLM
from .monitor import routing_stats

__all__ = [
    "TrainConfig",
    "TrainResult",
    "lr_at",
    "evaluate",
    "evaluate_stream",
    "train",
    "train_many",
    "course_run",
    "COURSE_MODEL",
    "COURSE_TRAINING",
    "load_or_train",
    "save_trained",
    "trained_model_path",
    "save_checkpoint",
    "state_digest",
    "continue_training",
    "main",
]

CHECKPOINT_FORMAT = 1
# bump when a change to the model or the training code changes what a run computes, so that
# load_or_train never returns a model trained by older code (2: paired initialisation)
TRAINING_CODE_VERSION = 3  # 3: val_full


@dataclass
class TrainConfig:
    """Optimisation settings. ``warmup_steps`` is capped at ``steps``; the learning rate
    rises linearly to ``lr`` over the warm-up, then follows a cosine down to
    ``min_lr_ratio * lr`` at the last step."""

    steps: int
    seed: int = 0
    batch_size: int = 16
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_every: int = 50
    eval_batches: int = 8
    eval_seed: int = 1234
    init_from: str | None = None  # state_digest of the starting weights (continued training), else None

    def __post_init__(self) -> None:
        check_positive_int("steps", self.steps)
        check_positive_int("seed", self.seed, minimum=0)
        check_positive_int("batch_size", self.batch_size)
        check_positive_float("lr", self.lr)
        check_positive_float("min_lr_ratio", self.min_lr_ratio, allow_zero=True)
        if self.min_lr_ratio > 1:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        check_positive_int("warmup_steps", self.warmup_steps, minimum=0)
        check_positive_float("weight_decay", self.weight_decay, allow_zero=True)
        check_positive_float("grad_clip", self.grad_clip, allow_zero=True)
        check_positive_int("eval_every", self.eval_every)
        check_positive_int("eval_batches", self.eval_batches)
        check_positive_int("eval_seed", self.eval_seed, minimum=0)
        if self.init_from is not None and not (
            isinstance(self.init_from, str) and len(self.init_from) == 16
            and all(c in "0123456789abcdef" for c in self.init_from)
        ):
            raise ValueError(f"init_from must be None or a state_digest (16 hex digits), got {self.init_from!r}")


@dataclass
class TrainResult:
    """The trained model, its configs and the history (plain lists, JSON-friendly).

    history keys: ``step``, ``loss`` (cross-entropy), ``aux_loss``, ``z_loss``, ``lr``,
    ``routing`` (per step: one ``routing_stats`` dict per MoE layer), ``val_step``, ``val_loss``
    (on ``eval_batches`` fixed windows), and after the last step ``val_full`` (the whole
    validation split, ``evaluate_stream``).
    """

    model: TinyLM
    config: LMConfig
    train_config: TrainConfig
    history: dict = field(default_factory=dict)
    seconds: float | None = None  # wall-clock training time, when this process trained it

    @property
    def final_val_loss(self) -> float:
        """Validation loss at the last step, on the ``eval_batches`` fixed windows (the curves' points)."""
        return self.history["val_loss"][-1]

    @property
    def full_val_loss(self) -> float:
        """Validation loss after training on the *whole* validation split (``evaluate_stream``):
        the number to compare models with."""
        return self.history["val_full"]


def _empty_history() -> dict:
    return {k: [] for k in ("step", "loss", "aux_loss", "z_loss", "lr", "routing", "val_step", "val_loss")}


def lr_at(step: int, tc: TrainConfig) -> float:
    """Learning-rate multiplier for optimizer step ``step`` (0-based): warm-up, then cosine."""
    warm = min(tc.warmup_steps, tc.steps)
    if step < warm:
        return (step + 1) / warm
    span = max(1, tc.steps - warm)
    progress = min(1.0, (step - warm) / span)
    return tc.min_lr_ratio + (1 - tc.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


@torch.no_grad()
def evaluate(model: TinyLM, batches: list[tuple[torch.Tensor, torch.Tensor]], device: str = "cpu") -> float:
    """Mean next-token cross-entropy (nats) over ``batches`` in eval mode (mode restored)."""
    was_training = model.training
    model.eval()
    try:
        losses = [float(model(x.to(device), y.to(device)).loss) for x, y in batches]
    finally:
        model.train(was_training)
    return sum(losses) / len(losses)


@torch.no_grad()
def evaluate_stream(model: TinyLM, stream: torch.Tensor, batch_size: int = 64, device: str = "cpu") -> float:
    """Mean next-token cross-entropy (nats) over a whole token stream, in eval mode.

    The stream is cut into consecutive, non-overlapping windows of ``seq_len`` tokens (the
    last partial window is dropped), every target predicted once; the mean is over tokens.
    On the course's validation split that is about 60,000 predictions, enough for a
    comparison of two models not to depend on which few windows were drawn.
    """
    if not isinstance(stream, torch.Tensor) or stream.dim() != 1 or stream.is_floating_point():
        raise TypeError("stream must be a 1-D integer tensor of token ids")
    check_positive_int("batch_size", batch_size)
    S = model.config.seq_len
    n = (stream.numel() - 1) // S
    if n == 0:
        raise ValueError(f"stream must hold at least seq_len + 1 = {S + 1} tokens, got {stream.numel()}")
    xs, ys = stream[: n * S].view(n, S), stream[1 : n * S + 1].view(n, S)
    was_training = model.training
    model.eval()
    total = 0.0
    try:
        for i in range(0, n, batch_size):
            x, y = xs[i : i + batch_size].to(device), ys[i : i + batch_size].to(device)
            total += float(model(x, y).loss) * y.numel()
    finally:
        model.train(was_training)
    return total / (n * S)


def _make_optimizer(model: TinyLM, tc: TrainConfig) -> torch.optim.AdamW:
    # decay matrices (and stacked expert weights), not norms' gains
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": tc.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=tc.lr, betas=(0.9, 0.95))


def save_checkpoint(path: str | os.PathLike, state: dict) -> Path:
    """``torch.save`` to a temporary file in the same folder, then ``os.replace``: a crash
    mid-write leaves the previous checkpoint intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def state_digest(state: dict) -> str:
    """A 16-hex-digit SHA-256 of a state dict (names, dtypes, shapes and every value): what
    ``TrainConfig.init_from`` holds for a run that starts from these weights."""
    if not isinstance(state, dict) or not state:
        raise TypeError("state must be a non-empty state dict {name: tensor}")
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name]
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"state[{name!r}] must be a tensor, got {type(t).__name__}")
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def _check_init(config: LMConfig, tc: TrainConfig, init_state: dict | None) -> None:
    if init_state is None:
        if tc.init_from is not None:
            raise ValueError("train_config.init_from is set, so the starting weights must be passed as init_state")
        return
    digest = state_digest(init_state)
    if tc.init_from != digest:
        raise ValueError(
            f"init_state has digest {digest} but train_config.init_from is {tc.init_from!r}; build the "
            "TrainConfig with init_from=state_digest(init_state) (continue_training does)"
        )


def _check_data(data: CorpusTokens, seq_len: int) -> None:
    if not isinstance(data, CorpusTokens):
        raise TypeError(f"data must be a moe_utils.data.CorpusTokens, got {type(data).__name__}")
    for name in ("train", "validation"):
        n = getattr(data, name).numel()
        if n < seq_len + 1:
            raise ValueError(f"seq_len={seq_len} needs at least {seq_len + 1} tokens, but the {name} split holds {n}")


def train(
    config: LMConfig,
    train_config: TrainConfig,
    data: CorpusTokens | None = None,
    *,
    checkpoint: str | os.PathLike | None = None,
    checkpoint_every: int | None = None,
    resume: bool = False,
    progress: bool = True,
    callback: Callable[[int, dict], None] | None = None,
    device: str = "cpu",
    init_state: dict | None = None,
) -> TrainResult:
    """Train a ``TinyLM(config)`` for ``train_config.steps`` optimizer steps.

    data:             token streams (default: the embedded corpus, ``corpus_tokens()``)
    init_state:       start from these weights (a ``TinyLM(config)`` state dict) instead of the
                      seeded initialisation; ``train_config.init_from`` must be its ``state_digest``
    checkpoint:       file to write every ``checkpoint_every`` steps and at the end
    resume:           continue from ``checkpoint`` when it exists (configs must match)
    progress:         show a tqdm bar
    callback:         called as ``callback(step, record)`` after each step (step is 1-based)
    """
    if not isinstance(config, LMConfig):
        raise TypeError(f"config must be an LMConfig, got {type(config).__name__}")
    if not isinstance(train_config, TrainConfig):
        raise TypeError(f"train_config must be a TrainConfig, got {type(train_config).__name__}")
    if checkpoint_every is not None:
        check_positive_int("checkpoint_every", checkpoint_every)
        if checkpoint is None:
            raise ValueError("checkpoint_every needs a checkpoint path")
    if resume and checkpoint is None:
        raise ValueError("resume=True needs a checkpoint path")
    tc = train_config
    _check_init(config, tc, init_state)
    data = corpus_tokens() if data is None else data
    _check_data(data, config.seq_len)

    torch.manual_seed(tc.seed)
    model = TinyLM(config).to(device)
    if init_state is not None:
        model.load_state_dict(init_state)
    opt = _make_optimizer(model, tc)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_at(s, tc))
    gen = torch.Generator().manual_seed(tc.seed)
    history = _empty_history()
    start = 0
    val_batches = fixed_batches(data.validation, tc.batch_size, config.seq_len, tc.eval_batches, tc.eval_seed)

    if resume and checkpoint is not None and Path(checkpoint).exists():
        state = torch.load(checkpoint, map_location=device, weights_only=True)
        if state.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"checkpoint: unknown format {state.get('format')!r}, expected {CHECKPOINT_FORMAT}")
        if state["model_config"] != config.to_dict() or state["train_config"] != asdict(tc):
            raise ValueError("checkpoint: it was written for a different model or train config; use a new path")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        gen.set_state(state["data_rng"])
        torch.set_rng_state(state["torch_rng"])
        history = state["history"]
        start = state["step"]

    def snapshot(step: int) -> dict:
        return {
            "format": CHECKPOINT_FORMAT,
            "model_config": config.to_dict(),
            "train_config": asdict(tc),
            "step": step,
            "model": model.state_dict(),
            "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(),
            "data_rng": gen.get_state(),
            "torch_rng": torch.get_rng_state(),
            "history": history,
        }

    if start == 0 and not history["val_step"]:
        history["val_step"].append(0)
        history["val_loss"].append(evaluate(model, val_batches, device))

    with warnings.catch_warnings():  # tqdm.auto warns in Jupyter without ipywidgets, then falls back to text
        warnings.simplefilter("ignore")
        from tqdm.auto import tqdm

    model.train()
    bar = tqdm(
        range(start, tc.steps), initial=start, total=tc.steps, desc=config.ffn, disable=not progress, mininterval=2.0
    )
    for i in bar:
        step = i + 1
        x, y = get_batch(data.train, tc.batch_size, config.seq_len, gen)
        out = model(x.to(device), y.to(device))
        loss = out.loss + out.aux_loss + out.z_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if tc.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        lr = opt.param_groups[0]["lr"]
        opt.step()
        model.after_optimizer_step()  # outside autograd: e.g. BiasBalancedRouter's bias update
        sched.step()

        record = {
            "loss": out.loss.item(),
            "aux_loss": out.aux_loss.item(),
            "z_loss": out.z_loss.item(),
            "lr": lr,
            "routing": [routing_stats(r) for r in out.routings if r is not None],
        }
        history["step"].append(step)
        for k, v in record.items():
            history[k].append(v)
        if step % tc.eval_every == 0 or step == tc.steps:
            history["val_step"].append(step)
            history["val_loss"].append(evaluate(model, val_batches, device))
            record["val_loss"] = history["val_loss"][-1]
        if progress:
            bar.set_postfix(loss=f"{record['loss']:.3f}", val=f"{history['val_loss'][-1]:.3f}", refresh=False)
        if checkpoint is not None and (
            (checkpoint_every is not None and step % checkpoint_every == 0) or step == tc.steps
        ):
            save_checkpoint(checkpoint, snapshot(step))
        if callback is not None:
            callback(step, record)
    bar.close()
    if history["step"] and history["step"][-1] == tc.steps and "val_full" not in history:
        history["val_full"] = evaluate_stream(model, data.validation, device=device)
    return TrainResult(model, config, tc, history)


# ----------------------------------------------------------------------------- the course's runs

# The model and training settings of notebook 07. Notebooks 08 and 09 build on the same runs
# (``course_run`` + ``load_or_train`` or ``train_many`` find them in the cache), and
# ``python -m moe_utils.bench`` times a training step at this size.
COURSE_MODEL = {"d_model": 64, "n_layers": 2, "n_heads": 4, "seq_len": 64, "d_ff": 128, "num_experts": 8}
COURSE_TRAINING = {"steps": 1500, "batch_size": 16, "lr": 3e-3, "warmup_steps": 20, "eval_every": 100,
                   "eval_batches": 8}


def course_run(ffn: str, seed: int = 0, *, steps: int | None = None, **model_options) -> tuple[LMConfig, TrainConfig]:
    """``(LMConfig, TrainConfig)`` of notebook 07's run of ``ffn`` ("dense", "switch", "mixtral")
    with ``seed``; ``model_options`` change model fields (``aux_loss_coef=0.0``...), ``steps``
    the number of steps."""
    config = LMConfig(ffn=ffn, **{**COURSE_MODEL, **model_options})
    training = {**COURSE_TRAINING, **({} if steps is None else {"steps": steps})}
    return config, TrainConfig(seed=seed, **training)


# ----------------------------------------------------------------------------- cache of trained models


# Fields added after TRAINING_CODE_VERSION 3, with their defaults: left out of the cache key
# while at the default, so that every run stored before they existed keeps its key.
_ADDED_MODEL_FIELDS = {"hash_table": "random", "granularity": 2, "n_shared": 1, "bias_update_rate": 1e-3,
                       "score_func": "softmax"}
_ADDED_TRAIN_FIELDS = {"init_from": None}


def _without_defaults(d: dict, added: dict) -> dict:
    return {k: v for k, v in d.items() if not (k in added and v == added[k])}


def _cache_key(config: LMConfig, tc: TrainConfig) -> str:
    blob = json.dumps(
        {"model": _without_defaults(config.to_dict(), _ADDED_MODEL_FIELDS),
         "train": _without_defaults(asdict(tc), _ADDED_TRAIN_FIELDS), "corpus": CORPUS_VERSION,
         "py": sys.version_info[:2], "code": TRAINING_CODE_VERSION},
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def trained_model_path(config: LMConfig, train_config: TrainConfig, cache: str | os.PathLike | None = None) -> Path:
    """Where ``load_or_train`` keeps a model: ``<cache>/models/<ffn>-<hash>.pt``."""
    return cache_dir(cache) / "models" / f"{config.ffn}-{_cache_key(config, train_config)}.pt"


def load_or_train(
    config: LMConfig,
    steps: int | TrainConfig,
    seed: int = 0,
    *,
    cache: str | os.PathLike | None = None,
    retrain: bool = False,
    progress: bool = True,
    **train_options,
) -> TrainResult:
    """A ``TinyLM`` trained on the embedded corpus, from the cache folder when present.

    The cache key covers the model config, every training option, the corpus
    version and the Python minor version (which fixes the stdlib text). The first
    call trains and stores ``{model, configs, history}`` atomically; later calls load
    it in a second. ``retrain=True`` trains again and overwrites the stored copy.
    ``train_options`` are further ``TrainConfig`` fields (``batch_size``, ``lr``...);
    or pass a whole ``TrainConfig`` as ``steps``: ``load_or_train(*course_run("switch"))``.
    """
    if not isinstance(config, LMConfig):
        raise TypeError(f"config must be an LMConfig, got {type(config).__name__}")
    if isinstance(steps, TrainConfig):
        if train_options or seed != 0:
            raise TypeError("with a TrainConfig as steps, give no seed or further training options")
        train_options = {k: v for k, v in asdict(steps).items() if k not in ("steps", "seed")}
        steps, seed = steps.steps, steps.seed
    unknown = set(train_options) - set(TrainConfig.__dataclass_fields__) - {"steps", "seed"}
    if unknown:
        raise TypeError(
            f"unknown training option(s) {sorted(unknown)}; allowed: {sorted(TrainConfig.__dataclass_fields__)}"
        )
    tc = TrainConfig(steps=steps, seed=seed, **train_options)
    if tc.init_from is not None:
        raise ValueError("load_or_train trains from a fresh initialisation; for a run with init_from use "
                         "train_many({name: (config, train_config, init_state)})")
    path = trained_model_path(config, tc, cache)
    if path.exists() and not retrain:
        return _load_trained(path, config, tc)
    result = train(config, tc, progress=progress)
    save_trained(result, cache)
    return result


def _load_trained(path: Path, config: LMConfig, tc: TrainConfig) -> TrainResult:
    state = torch.load(path, map_location="cpu", weights_only=True)
    model = TinyLM(config)
    model.load_state_dict(state["model"])
    return TrainResult(model, config, tc, state["history"])


def save_trained(result: TrainResult, cache: str | os.PathLike | None = None) -> Path:
    """Store a finished run where ``load_or_train`` looks for it (atomically); returns the path.

    Only for runs on the embedded default corpus: the cache key does not cover other data.
    """
    if not isinstance(result, TrainResult):
        raise TypeError(f"result must be a TrainResult, got {type(result).__name__}")
    state = {
        "model_config": result.config.to_dict(),
        "train_config": asdict(result.train_config),
        "model": result.model.state_dict(),
        "history": result.history,
    }
    return save_checkpoint(trained_model_path(result.config, result.train_config, cache), state)


# ----------------------------------------------------------------------------- several runs at once


def _train_job(config: LMConfig, tc: TrainConfig, data: CorpusTokens | None,
               init_state: dict | None = None) -> tuple[dict, dict, float]:
    """One run in a worker process: (state_dict, history, seconds). One thread per process,
    so a run computes exactly what ``train`` computes with ``torch.set_num_threads(1)``."""
    torch.set_num_threads(1)
    start = time.perf_counter()
    result = train(config, tc, data, progress=False, init_state=init_state)
    return result.model.state_dict(), result.history, time.perf_counter() - start


def train_many(
    jobs: dict,
    data: CorpusTokens | None = None,
    *,
    workers: int | None = None,
    cache: str | os.PathLike | None = None,
    use_cache: bool = True,
    device: str = "cpu",
    report: Callable[[str], None] | None = print,
) -> dict:
    """Train several models at once, one single-threaded process per CPU core.

    jobs:      ``{name: (LMConfig, TrainConfig)}``, or ``(LMConfig, TrainConfig, init_state)`` for a run
               that continues from given weights (``continue_training``); returns
               ``{name: TrainResult}`` in the same order
    data:      token streams (default: the embedded corpus); a custom corpus is never cached
    workers:   processes at a time (default: one per CPU core, at most one per job)
    use_cache: load runs that ``load_or_train`` stored before, and store new ones there
    device:    ``"cuda"`` trains the jobs one after another in this process instead
    report:    called with one line per finished run (name, steps, seconds, validation loss)

    Tiny models are too small for several threads to help one run, but independent runs
    share the cores perfectly: on 2 cores, two runs take the time of one. Each run uses
    one thread, so its numbers do not depend on ``workers`` or on the number of cores
    (``tests/test_train.py`` checks that it equals ``train`` in this process, bit for bit).
    """
    if not isinstance(jobs, dict) or not jobs:
        raise TypeError("jobs must be a non-empty dict {name: (LMConfig, TrainConfig)}")
    for name, job in jobs.items():
        if not (isinstance(job, tuple) and len(job) in (2, 3) and isinstance(job[0], LMConfig)
                and isinstance(job[1], TrainConfig) and (len(job) == 2 or isinstance(job[2], dict))):
            raise TypeError(f"jobs[{name!r}] must be a tuple (LMConfig, TrainConfig) or (LMConfig, TrainConfig, "
                            f"init_state), got {job!r}")
        _check_init(job[0], job[1], job[2] if len(job) == 3 else None)
    if workers is not None:
        check_positive_int("workers", workers)
    cacheable = use_cache and data is None
    results: dict = {}
    todo = {}
    for name, job in jobs.items():
        config, tc = job[0], job[1]
        path = trained_model_path(config, tc, cache)
        if cacheable and path.exists():
            results[name] = _load_trained(path, config, tc)
            if report is not None:
                report(f"{name}: loaded from the cache, validation loss {results[name].final_val_loss:.3f}")
        else:
            todo[name] = (config, tc, job[2] if len(job) == 3 else None)

    def finish(name, state, history, seconds):
        config, tc, _ = todo[name]
        model = TinyLM(config)
        model.load_state_dict(state)
        results[name] = TrainResult(model.to(device), config, tc, history, seconds)
        if cacheable:
            save_trained(results[name], cache)
        if report is not None:
            report(f"{name}: {tc.steps} steps in {seconds:.0f} s, validation loss {results[name].final_val_loss:.3f}")

    if device != "cpu" or len(todo) <= 1 or (workers or 2) == 1:
        threads = torch.get_num_threads()
        if device == "cpu":
            torch.set_num_threads(1)  # what a worker uses: the same numbers either way
        try:
            for name, (config, tc, init_state) in todo.items():
                start = time.perf_counter()
                r = train(config, tc, data, progress=False, device=device, init_state=init_state)
                finish(name, r.model.state_dict(), r.history, time.perf_counter() - start)
        finally:
            torch.set_num_threads(threads)
    elif todo:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed

        n = min(workers or os.cpu_count() or 1, len(todo))
        # spawn: works from a Jupyter kernel and with torch's thread pools already running
        with ProcessPoolExecutor(n, mp_context=multiprocessing.get_context("spawn")) as pool:
            # longest runs first (MoE steps cost more than dense ones), so no core idles at the end
            order = sorted(todo, key=lambda n: -todo[n][1].steps * (1.0 if todo[n][0].ffn == "dense" else 1.4))
            futures = {pool.submit(_train_job, todo[name][0], todo[name][1], data, todo[name][2]): name
                       for name in order}
            for fut in as_completed(futures):
                name = futures[fut]
                try:
                    state, history, seconds = fut.result()
                except Exception as err:
                    raise RuntimeError(f"training job {name!r} failed in its worker process: {err}") from err
                finish(name, state, history, seconds)
    return {name: results[name] for name in jobs}


def continue_training(config: LMConfig, init_state: dict, steps: int, seed: int = 0,
                      **train_options) -> tuple[LMConfig, TrainConfig, dict]:
    """A ``train_many`` job that trains ``config`` for ``steps`` more steps from ``init_state``
    (e.g. a trained dense model's state, or ``upcycle(dense).state_dict()``): returns
    ``(config, TrainConfig(steps, seed, init_from=state_digest(init_state), **train_options),
    init_state)``. The learning-rate schedule (warm-up, cosine) starts afresh; ``seed`` draws
    the batches. Notebook 09 continues a dense model and its upcycled copy this way."""
    if not isinstance(config, LMConfig):
        raise TypeError(f"config must be an LMConfig, got {type(config).__name__}")
    if "init_from" in train_options:
        raise TypeError("init_from is computed from init_state; do not pass it")
    tc = TrainConfig(steps=steps, seed=seed, init_from=state_digest(init_state), **train_options)
    with torch.random.fork_rng(devices=[]):  # leaves the caller's random stream untouched
        TinyLM(config).load_state_dict(init_state)  # refuse a state of another shape now, not in a worker
    return config, tc, init_state


# ----------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m moe_utils.train", description="Train a tiny dense or MoE byte-level LM."
    )
    p.add_argument("--model", required=True, choices=ALL_FFN_KINDS, help="FFN of every layer")
    p.add_argument("--steps", required=True, type=int, help="optimizer steps (>= 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup-steps", type=int, default=20)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--n-layers", type=int, default=2)
    p.add_argument("--n-heads", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--d-ff", type=int, default=128, help="dense hidden size f (switch experts f, mixtral experts f/2)")
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--aux-coef", type=float, default=None, help="balance-loss coefficient (default: per model)")
    p.add_argument("--z-coef", type=float, default=1e-3)
    p.add_argument("--checkpoint", default=None, help="checkpoint file (written atomically)")
    p.add_argument("--checkpoint-every", type=int, default=None)
    p.add_argument("--resume", action="store_true", help="continue from --checkpoint when it exists")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    try:
        cfg = LMConfig(
            ffn=a.model,
            d_model=a.d_model,
            n_layers=a.n_layers,
            n_heads=a.n_heads,
            seq_len=a.seq_len,
            d_ff=a.d_ff,
            num_experts=a.experts,
            aux_loss_coef=a.aux_coef,
            z_loss_coef=a.z_coef,
        )
        tc = TrainConfig(
            steps=a.steps,
            seed=a.seed,
            batch_size=a.batch_size,
            lr=a.lr,
            warmup_steps=a.warmup_steps,
            eval_every=a.eval_every,
        )
    except (TypeError, ValueError) as err:
        p.error(str(err))
    try:
        result = train(
            cfg,
            tc,
            checkpoint=a.checkpoint,
            checkpoint_every=a.checkpoint_every,
            resume=a.resume,
            progress=not a.no_progress,
        )
    except (TypeError, ValueError) as err:
        p.error(str(err))
    h = result.history
    print(f"{a.model}: step {h['step'][-1] if h['step'] else 0}, validation loss {h['val_loss'][-1]:.4f} nats/byte")
    if h["routing"]:
        for i, s in enumerate(h["routing"][-1]):
            print(
                f"  layer {i}: tokens per expert {s['tokens_per_expert']}, MaxVio {s['max_violation']:.2f}, "
                f"dropped {s['dropped_fraction']:.3f}, entropy {s['router_entropy']:.3f}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
