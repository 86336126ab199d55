"""05 - A transformer encoder: attention patterns, Q/K/V gradients, residual health, pre- vs post-norm.

    python examples/05_transformer.py [--out DIR] [--steps N] [--layers L]

AttentionAnalyzer reads every head's attention map through hooks (entropy, sparsity, sinks, head
diversity), the gradient norms of the query/key/value projections (their balance), the token diversity
and the gradient along the residual stream block by block, and the FFN's hidden units. Three encoders are
compared: pre-norm, post-norm, and a pre-norm encoder whose residual path is scaled down by 0.1 per
block (a degraded residual: the gradient reaching the first block fades, RESIDUAL_DECAY).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from gradflow_agent.analyze import AttentionAnalyzer, compare_reports


class ScaledResidualLayer(nn.TransformerEncoderLayer):
    """A pre-norm encoder layer whose identity path is multiplied by `alpha` (and branches start small)."""

    def __init__(self, *args, alpha: float = 0.1, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.alpha = alpha
        with torch.no_grad():
            self.self_attn.out_proj.weight.mul_(1e-3)
            self.linear2.weight.mul_(1e-3)

    def forward(self, src, src_mask=None, src_key_padding_mask=None, is_causal=False):
        x = self.alpha * src + self._sa_block(self.norm1(src), src_mask, src_key_padding_mask, is_causal=is_causal)
        return self.alpha * x + self._ff_block(self.norm2(x))


class Encoder(nn.Module):
    def __init__(self, layers: int, norm_first: bool = True, degraded: bool = False, d: int = 32, heads: int = 4,
                 vocab: int = 100) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(0.1 * torch.randn(1, 64, d))
        cls = ScaledResidualLayer if degraded else nn.TransformerEncoderLayer
        self.layers = nn.ModuleList(cls(d, heads, 4 * d, dropout=0.0, batch_first=True, norm_first=norm_first)
                                    for _ in range(layers))
        self.head = nn.Linear(d, 3)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens) + self.pos[:, :tokens.shape[1]]
        for layer in self.layers:
            x = layer(x)
        return self.head(x.mean(1))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=None)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--layers", type=int, default=4)
    args = p.parse_args(argv)
    out = Path(args.out or tempfile.mkdtemp(prefix="gradflow-05-"))
    torch.manual_seed(0)
    tokens, labels = torch.randint(0, 100, (32, 16)), torch.randint(0, 3, (32,))

    reports = {}
    for name, kw in (("pre-norm", {}), ("post-norm", {"norm_first": False}), ("degraded residual",
                                                                            {"degraded": True})):
        torch.manual_seed(1)
        attention = AttentionAnalyzer(num_heads=4)
        report = attention.analyze(Encoder(args.layers, **kw), tokens, labels, F.cross_entropy, steps=args.steps,
                                   title=f"05 transformer: {name}")
        st = attention.get_transformer_metrics()
        print(f"== {name}: entropy {st.attention_entropy_mean:.2f}, sparsity {st.attention_sparsity:.0%}, head "
              f"diversity {st.head_diversity:.2f}, rank-collapse risk {st.rank_collapse_risk}, residual gradient "
              f"first/last block {st.residual_gradient_ratio:.3g}")
        for layer, qkv in attention.get_attention_profile().items():
            print(f"   {layer:<22} |dQ| {qkv['q']:.2e} |dK| {qkv['k']:.2e} |dV| {qkv['v']:.2e} "
                  f"(max/min {qkv['imbalance']:.1f})")
        first = next(iter(st.layers.values()))
        print("   entropy per head (first layer):", " ".join(f"{e:.2f}" for e in first.entropy_per_head))
        for b in st.blocks:
            print(f"   {b.block:<10} {b.norm_placement:<9} |dL/d out| {b.output_grad_norm:.3g}  token residual "
                  f"{b.token_residual_out:.2f}  FFN dead units {b.ffn_dead_ratio:.0%}")
        kinds = report.summary()["issues_by_type"]
        print("   issues:", ", ".join(f"{k} x{n}" for k, n in sorted(kinds.items())) or "none")
        report.save_html(out / f"transformer_{name.replace(' ', '_')}.html")
        reports[name] = report
    diff = compare_reports(reports["pre-norm"], reports["post-norm"], "pre-norm", "post-norm")
    print(f"post-norm relative to pre-norm: {diff.verdict} (overall health {diff.overall_a:.0f} -> "
          f"{diff.overall_b:.0f})")
    print(f"reports written to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
