"""Cost of each training-dynamics metric per call, as a ratio to one training step, measured side by side.

One Llama-style language model trains in this process (forward, backward, AdamW step). In each round the
script times a block of training steps, then one call of every metric on the change over those steps,
so machine noise hits both alike; the table shows, per metric, the median time per call, the median
ratio to the round's median step time (min-max over the rounds), and what that costs per step when the
metric runs every `--interval` steps. Run on one thread, like bench/overhead.py:

    python bench/dynamics_cost.py                       # defaults: ~5 M parameters, 5 rounds
    python bench/dynamics_cost.py --d 512 --layers 8 --rounds 10 --device cuda
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gradflow_agent.dynamics import (  # noqa: E402
    AnalysisContext,
    GradientMetrics,
    MomentumMetrics,
    ParameterChangeMetrics,
    ParameterDelta,
    ParameterSnapshot,
    SparseQualityMetrics,
)


class Block(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.input_layernorm = nn.LayerNorm(d)
        self.self_attn = nn.ModuleDict({k: nn.Linear(d, d, bias=False) for k in ("q_proj", "k_proj", "v_proj",
                                                                                  "o_proj")})
        self.post_attention_layernorm = nn.LayerNorm(d)
        self.mlp = nn.ModuleDict({"gate_proj": nn.Linear(d, 4 * d, bias=False),
                                  "up_proj": nn.Linear(d, 4 * d, bias=False),
                                  "down_proj": nn.Linear(4 * d, d, bias=False)})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        a = self.self_attn
        h = self.input_layernorm(x)
        q, k, v = (a[n](h).view(b, t, self.heads, d // self.heads).transpose(1, 2) for n in ("q_proj", "k_proj",
                                                                                            "v_proj"))
        x = x + a["o_proj"](F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d))
        h = self.post_attention_layernorm(x)
        return x + self.mlp["down_proj"](F.silu(self.mlp["gate_proj"](h)) * self.mlp["up_proj"](h))


class TinyLlama(nn.Module):
    def __init__(self, vocab: int, d: int, layers: int, heads: int) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = self.embed_tokens(input_ids)
        for layer in self.layers:
            h = layer(h)
        return self.lm_head(self.norm(h))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--d", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=5, help="training steps per round (the delta spans them)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--interval", type=int, default=100, help="for the amortised cost column")
    ap.add_argument("--samples", type=int, default=8, help="sparse_quality_max_samples")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    model = TinyLlama(args.vocab, args.d, args.layers, args.heads).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    tokens = torch.randint(0, args.vocab, (args.batch, args.seq), device=device)

    def train_step() -> None:
        logits = model(tokens)
        F.cross_entropy(logits[:, :-1].reshape(-1, args.vocab), tokens[:, 1:].reshape(-1)).backward()
        opt.step()

    thresholds = (1e-8, 1e-6, 1e-4)
    snap_holder: dict[str, ParameterSnapshot] = {}

    def run_metric(computer) -> Callable[[], object]:
        def call() -> object:
            snap = snap_holder["snap"]
            delta = ParameterDelta.from_model(snap, model)
            ctx = AnalysisContext(model=model, inputs=tokens, step=args.steps, snapshot_step=0, optimizer=opt)
            return computer.compute(delta=delta, snapshot=snap, context=ctx)
        return call

    metrics: dict[str, Callable[[], object]] = {
        "snapshot float32 (cpu)": lambda: ParameterSnapshot.capture(model, dtype=torch.float32),
        "snapshot bfloat16 (cpu)": lambda: ParameterSnapshot.capture(model, dtype=torch.bfloat16),
        "param_change (global)": run_metric(ParameterChangeMetrics(thresholds)),
        "param_change (+layers, components)": run_metric(ParameterChangeMetrics(thresholds, True, True)),
        "sparse_quality (3 thresholds)": run_metric(SparseQualityMetrics(thresholds, include_random=False,
                                                                         max_samples=args.samples)),
        "sparse_quality (3 thr. + random)": run_metric(SparseQualityMetrics(thresholds, include_random=True,
                                                                            max_samples=args.samples)),
        "gradient": run_metric(GradientMetrics()),
        "momentum": run_metric(MomentumMetrics()),
    }
    for _ in range(2):  # warm-up: allocator, optimizer state, kernels
        train_step()
    for fn in metrics.values():
        snap_holder["snap"] = ParameterSnapshot.capture(model)
        fn()
    ratios: dict[str, list[float]] = {k: [] for k in metrics}
    seconds: dict[str, list[float]] = {k: [] for k in metrics}
    step_times: list[float] = []
    for _ in range(args.rounds):
        snap_holder["snap"] = ParameterSnapshot.capture(model)
        times = []
        for _ in range(args.steps):
            _sync(device)
            t0 = time.perf_counter()
            train_step()
            _sync(device)
            times.append(time.perf_counter() - t0)
        step = statistics.median(times)
        step_times.append(step)
        for name, fn in metrics.items():  # gradients and optimizer state of the last step are still there
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            dt = time.perf_counter() - t0
            seconds[name].append(dt)
            ratios[name].append(dt / step)
        opt.zero_grad()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"# {n_params / 1e6:.1f} M parameters, batch {args.batch} x {args.seq}, device {device}, "
          f"{torch.get_num_threads()} thread(s), torch {torch.__version__}")
    print(f"# training step (forward + backward + AdamW): median {statistics.median(step_times) * 1e3:.1f} ms "
          f"over {args.rounds} rounds of {args.steps} steps")
    print(f"{'metric':38s} {'ms/call':>9s} {'x step':>8s} {'(min-max)':>15s} {f'per step @{args.interval}':>15s}")
    for name in metrics:
        r = ratios[name]
        med = statistics.median(r)
        print(f"{name:38s} {statistics.median(seconds[name]) * 1e3:9.1f} {med:8.2f} "
              f"{f'({min(r):.2f}-{max(r):.2f})':>15s} {f'{100 * med / args.interval:.2f} %':>15s}")


if __name__ == "__main__":
    main()
