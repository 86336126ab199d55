"""02 - A text classifier with an embedding: sparse gradients, layer types and the depth profile.

    python examples/02_nlp_embedding.py [--out DIR] [--steps N]

An embedding only receives gradient in the rows of the tokens present in the batch, so its gradient
pressure and zero-gradient ratio look unlike a dense layer's. StandardAnalyzer groups statistics by layer
type and orders the parametric layers by forward execution (the depth profile).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from gradflow_agent.analyze import StandardAnalyzer


class TextClassifier(nn.Module):
    def __init__(self, vocab: int = 500, dim: int = 32, classes: int = 4) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab, dim)
        self.encoder = nn.Sequential(nn.Linear(dim, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU())
        self.classifier = nn.Linear(64, classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.encoder(self.embedding(tokens).mean(1)))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=None)
    p.add_argument("--steps", type=int, default=6)
    args = p.parse_args(argv)
    out = Path(args.out or tempfile.mkdtemp(prefix="gradflow-02-"))
    torch.manual_seed(0)
    tokens, labels = torch.randint(0, 500, (64, 24)), torch.randint(0, 4, (64,))

    analyzer = StandardAnalyzer()
    report = analyzer.analyze(TextClassifier(), tokens, labels, F.cross_entropy, steps=args.steps,
                              title="02 NLP embedding classifier")
    report.print_summary()
    report.print_issues()
    print("layer types:")
    for kind, s in analyzer.get_layer_type_stats().items():
        print(f"  {kind:<10} n={s['count']}  mean pressure {s['mean_pressure']:.3g}  "
              f"mean health {s['mean_health']:.0f}")
    print("depth profile (forward order):")
    for row in analyzer.get_depth_profile():
        print(f"  {row['depth']}: {row['layer']:<14} {row['type']:<10} pressure {row['pressure']:.3g}")
    emb, dense = report.get_layer("embedding"), report.get_layer("classifier")
    print(f"embedding vs dense: zero-gradient ratio {emb.grad_zero_ratio:.0%} vs {dense.grad_zero_ratio:.0%} "
          f"(only {int(tokens.unique().numel())} of 500 rows were used)")
    report.save_html(out / "nlp.html")
    print(f"report written to {out / 'nlp.html'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
