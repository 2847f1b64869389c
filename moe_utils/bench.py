"""The dispatch benchmark: ``python -m moe_utils.bench [--quick] [--device cpu|cuda]``.

GPU protocol (benchmarks/README.md): Mixtral layer shapes (d 4096, f 14336,
E 8, k 2, SwiGLU) at T in {128, 512, 2048, 4096, 16384} and Switch-Base shapes (d 768,
f 2048, E 8 and 128, k 1, GELU), bf16, routings uniform / balanced / Zipf / one-hot,
``triton.testing.do_bench`` medians, forward and forward+backward separately. Reported:
TFLOP/s, the ratio to a dense ``torch.mm`` chain of the same FLOPs (the "dense bound"),
and the speed-up of the Triton path over the loop reference, the torch path and
``torch._grouped_mm`` (where it exists).

CPU mode (runs anywhere): the course shape (T 4096, d 256, f 512, E 8, k 2, SwiGLU) and
a many-small-experts shape, float32, uniform routing; reference loop, torch path and a
dense FFN with the same active FLOPs, timed with ``time.perf_counter`` medians. Then the
training step of notebook 07's dense, Switch and Mixtral-style language models (one
thread each, as ``train_many`` runs them), with the target that an MoE step takes at
most 1.15 times the dense step.

Results go to ``benchmarks/results/<device>.json`` and a plot to ``benchmarks/<device>.png``.
Targets are stored in the JSON as ratios next to what was measured; nothing here asserts.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import time
from pathlib import Path

import torch

from .dispatch import moe_ffn
from .experts import ExpertBank
from .routers import Routing

__all__ = ["make_routing", "dense_ffn_fn", "run_cpu", "run_lm_steps", "run_gpu", "device_slug", "load_results", "plot_results", "main"]

ROUTINGS = ("uniform", "balanced", "zipf", "one_hot")
CPU_TARGETS = {"fwd_bwd_speedup_torch_vs_reference": 2.0, "moe_time_over_dense_time_max": 1.5,
               "lm_step_moe_over_dense_max": 1.15}


def make_routing(mode: str, T: int, E: int, k: int, device="cpu", seed: int = 0) -> Routing:
    """A dropless routing of T tokens to k distinct experts each.

    uniform: random experts; balanced: round robin (every expert gets T*k/E slots);
    zipf: expert e drawn with probability ~ 1/(e+1); one_hot: every token picks experts 0..k-1.
    Weights are random and renormalised over k (Mixtral style).
    """
    if mode not in ROUTINGS:
        raise ValueError(f"mode must be one of {ROUTINGS}, got {mode!r}")
    g = torch.Generator().manual_seed(seed)
    if mode == "uniform":
        idx = torch.rand(T, E, generator=g).topk(k, dim=1).indices
    elif mode == "balanced":
        idx = (torch.arange(T).unsqueeze(1) * k + torch.arange(k)) % E
    elif mode == "zipf":
        p = 1.0 / torch.arange(1, E + 1, dtype=torch.float64)
        idx = torch.multinomial(p.expand(T, E), k, replacement=False, generator=g)
    else:
        idx = torch.arange(k).expand(T, k).clone()
    w = torch.rand(T, k, generator=g) + 0.1
    w = w / w.sum(1, keepdim=True)
    return Routing.fixed(idx.to(device), w.to(device), E)


def moe_flops(T: int, d: int, f: int, k: int, kind: str) -> float:
    """Forward FLOPs of the routed experts: 2 per multiply-add, 2 or 3 matrices per expert."""
    return 2.0 * T * k * d * f * (3 if kind == "swiglu" else 2)


def dense_ffn_fn(rows: int, d: int, f: int, kind: str, dtype, device):
    """The dense bound: the same FFN as one expert on ``rows = T * k`` rows, plain torch.mm."""
    x = torch.randn(rows, d, dtype=dtype, device=device, requires_grad=True)
    ws = [(torch.randn(d, f, dtype=dtype, device=device) / math.sqrt(d)).requires_grad_() for _ in range(2 if kind == "swiglu" else 1)]
    w2 = (torch.randn(f, d, dtype=dtype, device=device) / math.sqrt(f)).requires_grad_()

    def fwd():
        h = torch.mm(x, ws[0])
        a = torch.nn.functional.silu(h) * torch.mm(x, ws[1]) if kind == "swiglu" else torch.nn.functional.gelu(h)
        return torch.mm(a, w2)

    return fwd, [x, *ws, w2]


def _cpu_times(fns: dict, repeats: int) -> dict:
    """Fastest ms of each function over ``repeats`` rounds, interleaved (one call of each per
    round) after one warm-up. Other work on the machine can only add time, so the fastest
    round is the best estimate of the code's own cost, and interleaving hits every candidate
    alike."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: min(ts) * 1e3 for name, ts in times.items()}


def _no_grad(fn):
    def call():
        with torch.no_grad():
            return fn()

    return call


def _fwd_bwd(fwd, params):
    def step():
        y = fwd()
        y.backward(torch.ones_like(y))
        for p in params:
            p.grad = None

    return step


def run_cpu(shapes=None, repeats: int = 5, backends=("reference", "torch"), seed: int = 0) -> list[dict]:
    """Time the CPU paths; one dict per (shape, backend) with fwd/fwd+bwd ms and ratios."""
    if shapes is None:
        shapes = [
            {"name": "course", "T": 4096, "d": 256, "f": 512, "E": 8, "k": 2, "kind": "swiglu"},
            {"name": "many-experts", "T": 4096, "d": 256, "f": 64, "E": 64, "k": 2, "kind": "swiglu"},
        ]
    rows = []
    for s in shapes:
        torch.manual_seed(seed)
        T, d, f, E, k, kind = s["T"], s["d"], s["f"], s["E"], s["k"], s["kind"]
        x = torch.randn(T, d, requires_grad=True)
        bank = ExpertBank(E, d, f, kind=kind)
        routing = make_routing("uniform", T, E, k, seed=seed)
        routing.weights.requires_grad_()
        params = [x, routing.weights, *bank.parameters()]
        flops = moe_flops(T, d, f, k, kind)
        dense_fwd, dense_params = dense_ffn_fn(T * k, d, f, kind, torch.float32, "cpu")
        fwds = {"dense": dense_fwd, **{b: (lambda b=b, x=x, r=routing, m=bank: moe_ffn(x, r, m, backend=b)) for b in backends}}
        t_fwd = _cpu_times({b: _no_grad(fn) for b, fn in fwds.items()}, repeats)
        t_bwd = _cpu_times({b: _fwd_bwd(fn, dense_params if b == "dense" else params) for b, fn in fwds.items()}, repeats)
        timed = {b: {"fwd": t_fwd[b], "fwd_bwd": t_bwd[b]} for b in fwds}
        dense = timed["dense"]
        for b, t in timed.items():
            row = {**s, "routing": "uniform", "dtype": "float32", "backend": b, "fwd_ms": t["fwd"], "fwd_bwd_ms": t["fwd_bwd"]}
            row["fwd_gflops"] = flops / t["fwd"] / 1e6
            row["fwd_bwd_gflops"] = 3 * flops / t["fwd_bwd"] / 1e6
            for p in ("fwd", "fwd_bwd"):
                row[f"{p}_time_over_dense"] = t[p] / dense[p]
                if "reference" in timed:
                    row[f"{p}_speedup_vs_reference"] = timed["reference"][p] / t[p]
            rows.append(row)
    return rows


def run_lm_steps(repeats: int = 7, steps: int = 20, ffns=("dense", "switch", "mixtral"),
                 configs: dict | None = None) -> dict:
    """Milliseconds per training step of notebook 07's language models, one thread each.

    The same step as ``moe_utils.train.train`` (forward, cross-entropy plus router losses,
    backward, gradient clipping, AdamW, ``after_optimizer_step``) at ``COURSE_MODEL`` size,
    batch 16. The models are timed in turns, ``steps`` steps per turn, and each model's
    fastest turn of ``repeats`` is kept (other work on the machine only ever adds time).
    Returns ``{"ms_per_step": {...}, "time_over_dense": {...}}``; all three models spend the
    same FFN FLOPs per token. ``configs``: ``{name: LMConfig}`` to time instead of ``ffns``
    (notebook 09 times its routers this way; a model named ``"dense"`` gives the ratios).
    """
    from .data import corpus_tokens, get_batch
    from .model import LMConfig, TinyLM
    from .train import COURSE_MODEL, COURSE_TRAINING, TrainConfig, _make_optimizer

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        data = corpus_tokens()
        tc = TrainConfig(seed=0, **COURSE_TRAINING)
        if configs is None:
            configs = {ffn: LMConfig(ffn=ffn, **COURSE_MODEL) for ffn in ffns}
        ffns = list(configs)
        state = {}
        for ffn, config in configs.items():
            if not isinstance(config, LMConfig):
                raise TypeError(f"configs[{ffn!r}] must be an LMConfig, got {type(config).__name__}")
            torch.manual_seed(0)
            model = TinyLM(config)
            state[ffn] = (model, _make_optimizer(model, tc), torch.Generator().manual_seed(0))

        def run(ffn, n):
            model, opt, gen = state[ffn]
            for _ in range(n):
                x, y = get_batch(data.train, tc.batch_size, model.config.seq_len, gen)
                out = model(x, y)
                opt.zero_grad(set_to_none=True)
                (out.loss + out.aux_loss + out.z_loss).backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
                opt.step()
                model.after_optimizer_step()

        best = {ffn: float("inf") for ffn in ffns}
        for ffn in ffns:
            run(ffn, 5)  # warm-up
        for _ in range(repeats):
            for ffn in ffns:
                t0 = time.perf_counter()
                run(ffn, steps)
                best[ffn] = min(best[ffn], (time.perf_counter() - t0) / steps * 1e3)
    finally:
        torch.set_num_threads(threads)
    out = {"ms_per_step": {k: round(v, 3) for k, v in best.items()}, "batch_tokens": tc.batch_size * COURSE_MODEL["seq_len"],
           "model": dict(COURSE_MODEL), "threads": 1, "protocol": f"fastest of {repeats} turns of {steps} steps"}
    if "dense" in best:
        out["time_over_dense"] = {k: round(v / best["dense"], 3) for k, v in best.items()}
    return out


def _grouped_mm_fn(x, routing, bank):
    """A forward of the MoE FFN with ``torch._grouped_mm`` on expert-sorted rows (sorted once)."""
    T, k = routing.indices.shape
    order = routing.indices.reshape(-1).argsort(stable=True)
    offs = torch.bincount(routing.indices.reshape(-1), minlength=bank.num_experts).cumsum(0).to(torch.int32)
    w = routing.weights.to(x.dtype).reshape(-1)[order].unsqueeze(1)

    def fwd():
        xs = x[order // k]
        h = torch._grouped_mm(xs, bank.w1, offs=offs)
        a = torch.nn.functional.silu(h) * torch._grouped_mm(xs, bank.w3, offs=offs) if bank.kind == "swiglu" else torch.nn.functional.gelu(h)
        ys = torch._grouped_mm(a, bank.w2, offs=offs) * w
        return torch.zeros_like(x).index_add(0, order // k, ys)

    return fwd


def run_gpu(quick: bool = False, seed: int = 0) -> list[dict]:
    """The GPU protocol of benchmarks/README.md on the current CUDA device (bf16)."""
    from triton.testing import do_bench

    dt, dev = torch.bfloat16, "cuda"
    if quick:
        shapes = [("mixtral", 4096, 14336, 8, 2, "swiglu", T) for T in (512, 4096)]
        shapes += [("switch-base", 768, 2048, E, 1, "gelu", 4096) for E in (8, 128)]
        routings = ("uniform", "one_hot")
    else:
        shapes = [("mixtral", 4096, 14336, 8, 2, "swiglu", T) for T in (128, 512, 2048, 4096, 16384)]
        shapes += [("switch-base", 768, 2048, E, 1, "gelu", T) for E in (8, 128) for T in (2048, 16384)]
        routings = ROUTINGS
    bench = lambda fn, params: do_bench(fn, warmup=10, rep=50, grad_to_none=params, return_mode="median")
    rows = []
    for name, d, f, E, k, kind, T in shapes:
        torch.manual_seed(seed)
        bank = ExpertBank(E, d, f, kind=kind).to(dev, dt)
        x = torch.randn(T, d, device=dev, dtype=dt, requires_grad=True)
        flops = moe_flops(T, d, f, k, kind)
        dense_fwd, dense_params = dense_ffn_fn(T * k, d, f, kind, dt, dev)
        with torch.no_grad():
            dense = {"fwd": bench(dense_fwd, None)}
        dense["fwd_bwd"] = bench(_fwd_bwd(dense_fwd, dense_params), dense_params)
        for mode in routings:
            routing = make_routing(mode, T, E, k, device=dev, seed=seed)
            routing.weights.requires_grad_()
            params = [x, routing.weights, *bank.parameters()]
            fns = {b: (lambda b=b, x=x, r=routing, m=bank: moe_ffn(x, r, m, backend=b)) for b in ("triton", "torch", "reference")}
            if hasattr(torch, "_grouped_mm"):
                fns["grouped_mm"] = _grouped_mm_fn(x, routing, bank)
            timed = {"dense": dense}
            for b, fwd in fns.items():
                t = {}
                try:
                    with torch.no_grad():
                        t["fwd"] = bench(fwd, None)
                    t["fwd_bwd"] = bench(_fwd_bwd(fwd, params), params)
                except Exception as exc:  # e.g. _grouped_mm without autograd or bf16 support here
                    t.setdefault("fwd", None)
                    t["fwd_bwd"], t["error"] = None, f"{type(exc).__name__}: {exc}"[:200]
                timed[b] = t
            for b, t in timed.items():
                row = {"name": name, "T": T, "d": d, "f": f, "E": E, "k": k, "kind": kind, "routing": mode,
                       "dtype": "bfloat16", "backend": b, "fwd_ms": t.get("fwd"), "fwd_bwd_ms": t.get("fwd_bwd")}
                if "error" in t:
                    row["error"] = t["error"]
                for p, mult in (("fwd", 1), ("fwd_bwd", 3)):
                    ms = t.get(p)
                    row[f"{p}_tflops"] = mult * flops / ms / 1e9 if ms else None
                    row[f"{p}_time_over_dense"] = ms / dense[p] if ms else None
                    tri = timed["triton"].get(p)
                    row[f"{p}_triton_speedup"] = ms / tri if ms and tri else None  # this backend's time / triton's
                rows.append(row)
            print(f"{name} T={T} E={E} {mode}: " + ", ".join(
                f"{b} {t.get('fwd_bwd') or float('nan'):.2f} ms" for b, t in timed.items()), flush=True)
    return rows


def device_slug(device: str) -> str:
    """``cpu-<model name>`` or the GPU name, lower-case with dashes (the results file name)."""
    if device == "cuda":
        name = torch.cuda.get_device_name()
    else:
        name = platform.processor() or platform.machine()
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    name = line.split(":", 1)[1]
                    break
        except OSError:
            pass
        name = f"cpu-{name}"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def load_results(folder="benchmarks/results", kind: str | None = None) -> list[dict]:
    """Every stored results file (optionally only ``kind`` "cpu" or "cuda"), newest layout."""
    out = []
    for p in sorted(Path(folder).glob("*.json")):
        data = json.loads(p.read_text())
        if kind is None or data.get("kind") == kind:
            out.append(data)
    return out


def plot_results(data: dict, axes=None):
    """CPU: bar chart of ms per backend and shape. GPU: TFLOP/s against T (uniform routing)."""
    import matplotlib.pyplot as plt

    rows = data["results"]
    if axes is None:
        _, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for ax, p in zip(axes, ("fwd", "fwd_bwd")):
        if data["kind"] == "cpu":
            shapes = sorted({r["name"] for r in rows}, key=[r["name"] for r in rows].index)
            backends = sorted({r["backend"] for r in rows}, key=[r["backend"] for r in rows].index)
            width = 0.8 / len(backends)
            for i, b in enumerate(backends):
                ms = [next(r[f"{p}_ms"] for r in rows if r["name"] == s and r["backend"] == b) for s in shapes]
                ax.bar([j + i * width for j in range(len(shapes))], ms, width, label=b)
            ax.set_xticks([j + 0.4 - width / 2 for j in range(len(shapes))], shapes)
            ax.set_ylabel("ms (median)")
        else:
            for (name, E), style in zip(sorted({(r["name"], r["E"]) for r in rows}), ("-", "--", ":")):
                for b, color in (("triton", "C0"), ("grouped_mm", "C1"), ("torch", "C2"), ("reference", "C3"), ("dense", "k")):
                    pts = sorted((r["T"], r[f"{p}_tflops"]) for r in rows if r["name"] == name and r["E"] == E
                                 and r["backend"] == b and r["routing"] == "uniform" and r[f"{p}_tflops"])
                    if pts and b != "dense":
                        ax.plot(*zip(*pts), style, color=color, marker="o", label=f"{b} {name} E{E}")
            ax.set_xscale("log", base=2)
            ax.set_xlabel("tokens T")
            ax.set_ylabel("TFLOP/s (median)")
        ax.set_title(f"{data['device']}: {'forward' if p == 'fwd' else 'forward + backward'}")
        ax.legend(fontsize=9)
    return axes


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Benchmark the batched MoE dispatch (see benchmarks/README.md).")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--quick", action="store_true", help="fewer shapes and repeats")
    parser.add_argument("--out", default="benchmarks", help="folder for results/<device>.json and <device>.png")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--no-lm", action="store_true", help="CPU: skip the language-model training-step timing")
    args = parser.parse_args(argv)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device visible")
    slug = device_slug(device)
    meta = {"device": slug, "kind": device, "torch": torch.__version__, "threads": torch.get_num_threads(),
            "date": time.strftime("%Y-%m-%d"), "quick": args.quick}
    if hasattr(os, "getloadavg"):  # other work on the machine inflates CPU timings; keep the record
        meta["load_average_1min_at_start"] = round(os.getloadavg()[0], 2)
    try:
        import triton

        meta["triton"] = triton.__version__
    except ImportError:
        meta["triton"] = None
    if device == "cuda":
        rows = run_gpu(quick=args.quick)
        meta["protocol"] = "triton.testing.do_bench median (warmup 10 ms, rep 50 ms), bf16, dropless routing"
    else:
        shapes = None
        if args.quick:
            shapes = [{"name": "course", "T": 4096, "d": 256, "f": 512, "E": 8, "k": 2, "kind": "swiglu"}]
        rows = run_cpu(shapes, repeats=3 if args.quick else 7)
        meta["protocol"] = "time.perf_counter, fastest of the rounds after one warm-up, float32, uniform routing"
        meta["targets"] = CPU_TARGETS
        course = {r["backend"]: r for r in rows if r["name"] == "course"}
        if "torch" in course:
            meta["course_shape_ratios"] = {
                k: round(course["torch"][k], 3)
                for k in ("fwd_speedup_vs_reference", "fwd_bwd_speedup_vs_reference", "fwd_time_over_dense", "fwd_bwd_time_over_dense")
            }
            meta["course_shape_ratios"]["reference_fwd_bwd_time_over_dense"] = round(course["reference"]["fwd_bwd_time_over_dense"], 3)
            meta["targets_met"] = {
                "fwd_bwd_speedup_torch_vs_reference": course["torch"]["fwd_bwd_speedup_vs_reference"] >= 2.0,
                "moe_time_over_dense_time_max": course["torch"]["fwd_bwd_time_over_dense"] <= 1.5,
            }
        for r in rows:
            print(f"{r['name']:>12} {r['backend']:>9}: fwd {r['fwd_ms']:8.1f} ms  fwd+bwd {r['fwd_bwd_ms']:8.1f} ms  "
                  f"x dense {r['fwd_bwd_time_over_dense']:.2f}", flush=True)
        if not args.no_lm:
            lm = run_lm_steps(repeats=3 if args.quick else 7)
            meta["lm_training_step"] = lm
            worst = max(v for k, v in lm["time_over_dense"].items() if k != "dense")
            meta.setdefault("targets_met", {})["lm_step_moe_over_dense_max"] = worst <= CPU_TARGETS["lm_step_moe_over_dense_max"]
            print("LM training step (notebook 07 size, 1 thread): "
                  + ", ".join(f"{k} {v:.2f} ms (x{lm['time_over_dense'][k]:.2f})" for k, v in lm["ms_per_step"].items()))
    out = Path(args.out)
    (out / "results").mkdir(parents=True, exist_ok=True)
    data = {**meta, "results": rows}
    path = out / "results" / f"{slug}.json"
    path.write_text(json.dumps(data, indent=1) + "\n")
    print(f"wrote {path}")
    if not args.no_plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        plot_results(data)
        plt.tight_layout()
        plt.savefig(out / f"{slug}.png", dpi=110)
        print(f"wrote {out / (slug + '.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
