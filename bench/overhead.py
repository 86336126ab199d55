"""Training-step overhead of the agent, as a ratio to the unmonitored step, measured side by side.

Two identical copies of each workload train in one process, one with the agent attached; blocks of
steps alternate between them (A B A B ...) so that machine noise hits both alike. Each round gives the
ratio of the two blocks' median step times; the table shows the median ratio and its min-max over the
rounds. Step time is the process's CPU time (`time.process_time`, which also counts the agent's own
threads): on a shared machine it is far less disturbed by other processes than wall time, and with
one thread it equals the wall time of an otherwise idle machine. `--clock wall` uses wall time. While
the agent trains, another process scrapes its /metrics (`--scrape`, 1 per second by default, as
bench/scrape.py does; 0: none), so the step times include serving the scrapes.
`--runs 2 --table` repeats the whole run and ends with a Markdown table of the pooled rounds. Run on one
thread, like the reference figures in the README:

    python bench/overhead.py                       # all workloads, default config and "every statistic"
    python bench/overhead.py --workloads tiny --rounds 30
    python bench/overhead.py --compile --workloads tiny mlp    # both copies torch.compile'd
    python bench/overhead.py --runs 2 --table      # two full runs, then a README-ready Markdown table
    python bench/overhead.py --device cuda --runs 2 --table    # on a GPU (wall clock, synced per step)
    python bench/overhead.py --workloads cnn --budget 0.02     # another sampling.overhead_budget
    python bench/overhead.py --scrape 0                        # no scraper
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from scrape import Scraper  # noqa: E402  (bench/scrape.py, next to this file)

import gradflow_agent  # noqa: E402

CONFIGS = {
    "default": {"exporters": {"prometheus": {"port": 0, "addr": "127.0.0.1"}}},
    "all": {"exporters": {"prometheus": {"port": 0, "addr": "127.0.0.1"}},
            "sampling": {"every_n_steps": 1},
            "stats": {"parameters": {"every_n_steps": 1}, "activations": {"dead_units": True}}},
    # attention statistics (sampled query rows recomputed from q and k) on top of the default
    "attention": {"exporters": {"prometheus": {"port": 0, "addr": "127.0.0.1"}},
                  "stats": {"attention": {"enabled": True}}},
}


class TinyTransformer(nn.Module):
    def __init__(self, vocab=8000, d=256, heads=4, ff=1024, layers=6):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        layer = nn.TransformerEncoderLayer(d, heads, ff, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d, vocab)

    def forward(self, tokens):
        return self.head(self.encoder(self.embed(tokens)))


def _cnn() -> nn.Module:
    blocks, c = [], 3
    for out in (32, 64, 96, 128):
        blocks += [nn.Conv2d(c, out, 3, padding=1), nn.BatchNorm2d(out), nn.ReLU(), nn.MaxPool2d(2)]
        c = out
    return nn.Sequential(*blocks, nn.Flatten(), nn.Linear(128 * 4 * 4, 10))


def _mlp(width: int, depth: int, d_in: int, d_out: int) -> nn.Module:
    layers, a = [], d_in
    for _ in range(depth - 1):
        layers += [nn.Linear(a, width), nn.ReLU()]
        a = width
    return nn.Sequential(*layers, nn.Linear(a, d_out))


def workloads() -> dict[str, Callable[[], tuple[nn.Module, Callable]]]:
    """name -> factory of (model, batch) where batch() gives (x, y) and the loss is cross-entropy."""
    def transformer():
        tokens = torch.randint(0, 8000, (16, 128))
        return TinyTransformer(), lambda: (tokens, tokens)

    def mlp():
        x, y = torch.randn(256, 1024), torch.randint(0, 10, (256,))
        return _mlp(1024, 12, 1024, 10), lambda: (x, y)

    def cnn():
        x, y = torch.randn(64, 3, 64, 64), torch.randint(0, 10, (64,))
        return _cnn(), lambda: (x, y)

    def tiny():
        x, y = torch.randn(32, 128), torch.randint(0, 10, (32,))
        return _mlp(128, 4, 128, 10), lambda: (x, y)

    def deep():  # 1000 narrow layers: per-layer dispatch dominates
        x, y = torch.randn(32, 64), torch.randint(0, 10, (32,))
        return _mlp(64, 501, 64, 10), lambda: (x, y)

    return {"transformer": transformer, "mlp": mlp, "cnn": cnn, "tiny": tiny, "deep": deep}


def _step(model, opt, batch, agent=None) -> None:
    x, y = batch()
    out = FORWARD.get(id(model), model)(x)
    loss = nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    if agent is not None:
        agent.step(loss=loss)


CLOCK = time.process_time
FORWARD: dict[int, Callable] = {}  # id(model) -> its compiled forward (--compile)
COMPILE = False
DEVICE = torch.device("cpu")
SETTLE = 1024
SCRAPE = 1.0  # scrapes of the monitored copy's /metrics per second, from another process (0: none)
CADENCE: dict[str, str] = {}  # workload -> 'activation/parameter cadence' the budget settled at (last)


def _block(model, opt, batch, steps, agent=None) -> float:
    times = []
    for _ in range(steps):
        t0 = CLOCK()
        _step(model, opt, batch, agent)
        if DEVICE.type == "cuda":  # the bench waits for the step's kernels (the agent itself never does)
            torch.cuda.synchronize()
        times.append(CLOCK() - t0)
    return statistics.median(times)


def measure(name: str, config: dict, rounds: int, steps: int) -> tuple[list[float], float]:
    """(the ratio of every round, the median unmonitored step time)."""
    torch.manual_seed(0)
    model, cpu_batch = workloads()[name]()
    model = model.to(DEVICE)
    on_device = tuple(t.to(DEVICE) for t in cpu_batch())

    def batch():
        return on_device
    twin = copy.deepcopy(model)
    opt = torch.optim.Adam(model.parameters(), 1e-4)
    opt_twin = torch.optim.Adam(twin.parameters(), 1e-4)
    agent = gradflow_agent.attach(twin, config, optimizer=opt_twin)
    scraper = Scraper(agent.prometheus_url, SCRAPE) if SCRAPE > 0 and agent.prometheus_url else None
    if scraper is not None:
        scraper.on()
        scraper.wait_first()
    if COMPILE:  # attach first, then compile: the agent's statistics are traced into the graph
        FORWARD[id(model)], FORWARD[id(twin)] = torch.compile(model), torch.compile(twin)
    for _ in range(2):  # warm-up both
        _block(model, opt, batch, steps)
        _block(twin, opt_twin, batch, steps, agent)
    # the overhead budget re-judges its cadence as it trains: measure where it settles, as a run of
    # thousands of steps sees it - until two judgment windows in a row leave it alone, at most --settle
    # steps (--settle 0 measures from the start)
    before, done = None, 0
    while done < SETTLE:
        window = agent.budget.window  # a block of one judgment window: each block sees one judgment
        _block(twin, opt_twin, batch, window, agent)
        done += window
        now = (agent.budget.activations, agent.budget.parameters)
        if now == before:
            break
        before = now
    ratios, base = [], []
    for r in range(rounds):
        if r % 2:  # alternate which goes first
            b = _block(twin, opt_twin, batch, steps, agent)
            a = _block(model, opt, batch, steps)
        else:
            a = _block(model, opt, batch, steps)
            b = _block(twin, opt_twin, batch, steps, agent)
        ratios.append(b / a)
        base.append(a)
    CADENCE[name] = f"{agent.activation_every_steps}/{agent.parameter_every}"
    if scraper is not None and not scraper.stop():
        raise SystemExit(f"bench: nothing scraped {agent.prometheus_url} during {name}")
    agent.detach()
    return ratios, statistics.median(base)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workloads", nargs="+", default=list(workloads()), choices=list(workloads()))
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--rounds", type=int, default=0, help="rounds per workload (0 = by workload size)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--clock", choices=("cpu", "wall"), default="cpu")
    parser.add_argument("--compile", action="store_true", help="torch.compile both copies")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (wall clock, a sync after each step)")
    parser.add_argument("--runs", type=int, default=1, help="full runs over every workload (the table pools "
                                                             "their rounds)")
    parser.add_argument("--settle", type=int, default=1024, help="agent steps before measuring, for the "
                                                                 "overhead budget to settle its cadence")
    parser.add_argument("--scrape", type=float, default=1.0, help="scrapes of /metrics per second while the "
                                                                    "agent trains (0: no scraper)")
    parser.add_argument("--budget", type=float, default=None, help="sampling.overhead_budget for every config "
                                                                    "(default: the agent's default)")
    parser.add_argument("--table", action="store_true", help="end with a Markdown table for the README")
    args = parser.parse_args()
    global CLOCK, COMPILE, SETTLE, DEVICE, SCRAPE
    COMPILE, SETTLE, DEVICE, SCRAPE = args.compile, args.settle, torch.device(args.device), args.scrape
    # on an accelerator the step is the device's time: wall clock (process time would miss it)
    CLOCK = time.process_time if args.clock == "cpu" and DEVICE.type == "cpu" else time.perf_counter
    torch.set_num_threads(args.threads)
    plan = {"transformer": (8, 3), "mlp": (10, 4), "cnn": (10, 4), "tiny": (30, 50), "deep": (6, 5)}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), "
          f"{'cpu' if CLOCK is time.process_time else 'wall'} clock, {DEVICE}, gradflow_agent "
          f"{gradflow_agent.__version__}{', compiled' if COMPILE else ''}, "
          f"{f'/metrics scraped {SCRAPE:g}/s' if SCRAPE > 0 else 'no scraper'}")
    print(f"{'workload':<12} {'config':<8} {'step (ms)':>10} {'ratio':>7}  {'min-max':>13} {'every (act/par)':>15}")
    pooled: dict[tuple[str, str], tuple[list[float], list[float]]] = {}
    cadences: dict[tuple[str, str], list[str]] = {}
    for run in range(args.runs):
        if args.runs > 1:
            print(f"-- run {run + 1} of {args.runs}")
        for name in args.workloads:
            rounds, steps = plan[name]
            for cfg_name in args.configs:
                cfg = CONFIGS[cfg_name] if args.budget is None else \
                    {**CONFIGS[cfg_name], "sampling": {**CONFIGS[cfg_name].get("sampling", {}),
                                                       "overhead_budget": args.budget}}
                ratios, base = measure(name, cfg, args.rounds or rounds, steps)
                all_ratios, bases = pooled.setdefault((name, cfg_name), ([], []))
                all_ratios += ratios
                bases.append(base)
                print(f"{name:<12} {cfg_name:<8} {base * 1e3:>10.2f} {statistics.median(ratios):>6.3f}x  "
                      f"{min(ratios):.3f}-{max(ratios):.3f} {CADENCE[name]:>15}", flush=True)
                cadences.setdefault((name, cfg_name), []).append(CADENCE[name])
    if args.table:
        print(table(pooled, cadences, args))


def table(pooled: dict[tuple[str, str], tuple[list[float], list[float]]], cadences: dict[tuple[str, str], list[str]],
          args) -> str:
    """A Markdown table: per workload and config, the median and min-max of the round ratios of all runs
    pooled (each round: one interleaved pair of blocks), the median unmonitored step time, and the
    activation cadences the overhead budget settled at."""
    lines = ["", f"`{' '.join(['python', 'bench/overhead.py', *sys.argv[1:]])}` (torch {torch.__version__}, "
             f"{torch.get_num_threads()} thread(s), {args.clock} clock, {args.runs} run(s)"
             f"{', compiled' if args.compile else ''}, /metrics scraped {args.scrape:g}/s)", "",
             "| workload | config | step (ms) | ratio (median) | min-max | activations / parameters every |",
             "|---|---|---:|---:|---:|---:|"]
    for (name, cfg_name), (ratios, bases) in pooled.items():
        lines.append(f"| {name} | {cfg_name} | {statistics.median(bases) * 1e3:.2f} | "
                     f"{statistics.median(ratios):.3f}x | {min(ratios):.3f}-{max(ratios):.3f} | "
                     f"{', '.join(cadences[name, cfg_name])} |")
    return "\n".join(lines)

if __name__ == "__main__":
    main()
