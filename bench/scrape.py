"""What scraping costs a training job: server time per scrape, series, and the step-time impact.

For each depth (N x (Linear(64) + ReLU) blocks = 2N layers) one agent serves /metrics while the model
trains; a scraper process fetches /metrics at `--rate` per second during alternate blocks of steps
(A B A B ..., as bench/overhead.py does), so the ratio of the scraped blocks' median step time to the
unscraped ones' is the impact of scraping, measured side by side in one run. Also printed: the series
of one scrape, the server time of a scrape (request to last byte, on loopback) and its size, and the
time to render one snapshot on the render thread.

    python bench/scrape.py                               # 100, 1000 and 5000 layers, 10 scrapes/s
    python bench/scrape.py --layers 512 --rate 10 --rounds 10
"""

from __future__ import annotations

import argparse
import gzip
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import gradflow_agent  # noqa: E402

PROMETHEUS_ACCEPT = ("application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;"
                     "q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1")


def _model(layers: int) -> nn.Sequential:
    blocks: list[nn.Module] = []
    for _ in range(max(1, layers // 2)):
        blocks += [nn.Linear(64, 64), nn.ReLU()]
    return nn.Sequential(*blocks)


def _scrape(url: str) -> tuple[float, int, int]:
    """(seconds, bytes, series) of one scrape as Prometheus asks for it (OpenMetrics, gzip)."""
    request = urllib.request.Request(url, headers={"Accept": PROMETHEUS_ACCEPT, "Accept-Encoding": "gzip"})
    t0 = time.perf_counter()
    with urllib.request.urlopen(request, timeout=30) as response:
        body = response.read()
    seconds = time.perf_counter() - t0
    text = gzip.decompress(body).decode()
    series = sum(1 for line in text.splitlines() if line and not line.startswith("#"))
    return seconds, len(body), series


_SCRAPER = """
import os, sys, time, urllib.request
url, period, flag, out = sys.argv[1], float(sys.argv[2]), sys.argv[3], sys.argv[4]
headers = {"Accept": sys.argv[5], "Accept-Encoding": "gzip"}
times = []
while os.path.exists(flag + ".run"):
    if not os.path.exists(flag):
        time.sleep(0.01)
        continue
    t0 = time.perf_counter()
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=30) as r:
        r.read()
    times.append(time.perf_counter() - t0)
    if len(times) == 1:
        open(flag + ".first", "w").close()
    time.sleep(max(0.0, period - (time.perf_counter() - t0)))
open(out, "w").write(" ".join(map(str, times)))
"""


class Scraper:
    """Another process (as Prometheus is) scraping at `rate` per second while `on()`; fetches the bytes
    only, so that the training process pays for serving the scrape and nothing else."""

    def __init__(self, url: str, rate: float) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="gradflow-scrape-"))
        self.flag = self.dir / "on"
        (self.dir / "on.run").touch()
        self.out = self.dir / "times"
        self.proc = subprocess.Popen([sys.executable, "-c", _SCRAPER, url, str(1.0 / rate), str(self.flag),
                                      str(self.out), PROMETHEUS_ACCEPT])

    def on(self) -> None:
        self.flag.touch()

    def wait_first(self, timeout: float = 60.0) -> None:
        """Until the first scrape has been served (or raise): a bench measures with the scraper running."""
        deadline = time.monotonic() + timeout
        while not (self.dir / "on.first").exists():
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise SystemExit(f"bench: the scraper served nothing in {timeout:g} s")
            time.sleep(0.01)

    def off(self) -> None:
        self.flag.unlink(missing_ok=True)

    def stop(self) -> list[float]:
        self.off()
        (self.dir / "on.run").unlink()
        self.proc.wait(timeout=30)
        times = [float(t) for t in self.out.read_text().split()] if self.out.exists() else []
        shutil.rmtree(self.dir, ignore_errors=True)
        return times


def measure(layers: int, rate: float, rounds: int, steps: int) -> dict[str, float]:
    torch.manual_seed(0)
    model = _model(layers)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    agent = gradflow_agent.attach(model, {"exporters": {"prometheus": {"port": 0, "addr": "127.0.0.1"}},
                                          "sampling": {"export_every_n_steps": 10}}, optimizer=opt)
    x = torch.randn(32, 64)

    def block() -> float:
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            loss = model(x).pow(2).mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
            agent.step(loss=loss)
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    try:
        block()  # warm up; publishes snapshots
        time.sleep(0.5)
        _scrape(agent.prometheus_url)  # asked for once: rendered ahead from now on
        render = agent.exporters[0].app  # the render of one snapshot, as the render thread does it
        content_type, encoder = next(iter(render._encoders.items()))
        t0 = time.perf_counter()
        render._render(content_type, encoder)
        render_s = time.perf_counter() - t0
        one = [_scrape(agent.prometheus_url) for _ in range(5)]
        scraper = Scraper(agent.prometheus_url, rate)
        ratios = []
        try:
            for _ in range(rounds):
                quiet = block()
                scraper.on()
                scraped = block()
                scraper.off()
                ratios.append(scraped / quiet)
        finally:
            times = scraper.stop()
        return {"layers": len(agent.layers), "series": one[-1][2], "bytes": one[-1][1],
                "scrape_ms": 1e3 * statistics.median(t for t, _, _ in one),
                "scrape_ms_during": 1e3 * statistics.median(times) if times else float("nan"),
                "render_ms": 1e3 * render_s, "ratio": statistics.median(ratios),
                "ratio_min": min(ratios), "ratio_max": max(ratios), "scrapes": len(times)}
    finally:
        agent.detach()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[100, 1000, 5000])
    parser.add_argument("--rate", type=float, default=10.0, help="scrapes per second while scraping")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps", type=int, default=20, help="steps per block")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print(f"{'layers':>6} {'series':>7} {'KiB gz':>7} {'scrape ms':>9} {'busy ms':>8} {'render ms':>9} "
          f"{'step ratio (min-max)':>22}")
    for n in args.layers:
        r = measure(n, args.rate, args.rounds, args.steps)
        print(f"{r['layers']:>6} {r['series']:>7} {r['bytes'] / 1024:>7.0f} {r['scrape_ms']:>9.1f} "
              f"{r['scrape_ms_during']:>8.1f} {r['render_ms']:>9.0f} "
              f"{r['ratio']:>8.3f} ({r['ratio_min']:.3f}-{r['ratio_max']:.3f})")
    print(f"scrape ms: server time of one scrape (OpenMetrics, gzip) on loopback; busy ms: the same while "
          f"training, at {args.rate:g}/s;\nrender ms: one snapshot rendered on the render thread; step "
          f"ratio: median step time scraped / not scraped.")


if __name__ == "__main__":
    main()
