"""`SparseQualityMetrics`: would a sparse update have done as well as the full one?

For each threshold t the weights are set to W_sparse = W_new where |Δ| > t and W_old elsewhere (the
updates with |Δ| <= t are zeroed), the model is run on the given inputs, and its outputs are compared with
those of the fully updated model W_new. With the random baseline, a random mask keeping the same
fraction of each parameter's elements is compared too: if magnitude selection is much better than
random, the large changes carry the update (a good sign for sparse or low-rank fine-tuning).

Keys, per threshold t: sparse/kl_at_<t>, cosine_at_<t>, mse_at_<t>, top1_agree_at_<t>, kept_ratio_at_<t>,
unchanged_ratio_at_<t>, and kl/cosine/mse/top1_agree_at_<t>_random.

Outputs are compared position by position along the last dimension (classes, vocabulary): KL(P_full ||
P_sparse) of the softmaxes, cosine similarity and MSE of the logits, agreement of the argmax; positions
where an `attention_mask` is 0 are left out. The model is put in eval mode and run under no_grad, and is
left exactly as found: W_new is backed up (on the snapshot's device, in the parameters' dtype), restored
in a `finally`, and verified bit for bit. Memory: one backup of the tracked parameters on the snapshot's
device while it runs; on the model's device only chunk-sized temporaries and two sets of outputs.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..export.metrics import Metric
from .computer import MetricComputer, format_threshold
from .config import DEFAULT_THRESHOLDS
from .snapshot import DEFAULT_CHUNK, ParameterMismatchError, ParameterSnapshot, delta_chunk

log = logging.getLogger("gradflow_agent")


@dataclass(frozen=True)
class ModelCall:
    """Positional and keyword arguments of one model call (what the agent plug-in captures)."""

    args: tuple = ()
    kwargs: Mapping[str, Any] = field(default_factory=dict)


# -- inputs and outputs -------------------------------------------------------------------------------------
def _map_tensors(obj: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, ModelCall):
        return ModelCall(_map_tensors(obj.args, fn), _map_tensors(dict(obj.kwargs), fn))
    if isinstance(obj, Mapping):
        return {k: _map_tensors(v, fn) for k, v in obj.items()}
    if type(obj) in (list, tuple):
        return type(obj)(_map_tensors(v, fn) for v in obj)
    return obj


def _first_tensor(obj: Any) -> torch.Tensor | None:
    found: list[torch.Tensor] = []

    def grab(t: torch.Tensor) -> torch.Tensor:
        if not found and t.dim() > 0:
            found.append(t)
        return t

    _map_tensors(obj, grab)
    return found[0] if found else None


def prepare_inputs(inputs: Any, device: torch.device, max_samples: int = 0) -> Any:
    """Inputs moved to `device`, cut to the first `max_samples` rows of the batch (0 = all)."""
    first = _first_tensor(inputs)
    batch = first.shape[0] if first is not None else None

    def fix(t: torch.Tensor) -> torch.Tensor:
        if max_samples and batch is not None and t.dim() > 0 and t.shape[0] == batch:
            t = t[:max_samples]
        return t.to(device, non_blocking=True) if t.device != device else t

    return _map_tensors(inputs, fix)


def _takes(model: nn.Module, n: int) -> bool:
    """Can `model.forward` take `n` positional arguments? (unknown signatures: yes)"""
    try:
        inspect.signature(model.forward).bind(*range(n))
    except TypeError:
        return False
    except ValueError:  # no signature (builtins)
        return True
    return True


_BATCH_HINTED: set[int] = set()


def call_model(model: nn.Module, inputs: Any) -> Any:
    """ModelCall -> model(*args, **kwargs); mapping -> model(**inputs); tuple/list -> model(*inputs).

    A DataLoader batch `(x, y)` given to a model whose forward takes one input is `model(x)` (the
    usual quick start passes the batch as it comes), said once in the log."""
    if isinstance(inputs, ModelCall):
        return model(*inputs.args, **dict(inputs.kwargs))
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if type(inputs) in (list, tuple):
        if len(inputs) == 2 and not _takes(model, 2) and _takes(model, 1):
            if id(model) not in _BATCH_HINTED:
                _BATCH_HINTED.add(id(model))
                log.info("gradflow_agent: the sparse-quality inputs look like a DataLoader batch (x, y) and "
                         "%s.forward takes one input: calling it with x (pass inputs=x to choose)",
                         type(model).__name__)
            return model(inputs[0])
        return model(*inputs)
    return model(inputs)


def extract_logits(output: Any) -> torch.Tensor:
    """The logits of a model output: a tensor, `.logits`, `["logits"]`, or the first tensor of a tuple."""
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(output, Mapping) and isinstance(output.get("logits"), torch.Tensor):
        return output["logits"]
    if isinstance(output, (list, tuple)):
        for item in output:
            if isinstance(item, torch.Tensor):
                return item
    raise TypeError(f"cannot find logits in a model output of type {type(output).__name__}; "
                    "pass forward_fn=lambda model, inputs: <logits tensor>")


def _attention_rows(inputs: Any, logits: torch.Tensor) -> torch.Tensor | None:
    kwargs = inputs.kwargs if isinstance(inputs, ModelCall) else inputs if isinstance(inputs, Mapping) else {}
    mask = kwargs.get("attention_mask") if isinstance(kwargs, Mapping) else None
    if isinstance(mask, torch.Tensor) and tuple(mask.shape) == tuple(logits.shape[:-1]):
        return mask.reshape(-1).to(logits.device) != 0
    return None


def compare_outputs(full: torch.Tensor, other: torch.Tensor, rows: torch.Tensor | None = None,
                    chunk_elements: int = DEFAULT_CHUNK) -> dict[str, float]:
    """kl, cosine, mse, top1_agree of `other` against `full`, averaged over positions (last dim = classes)."""
    c = full.shape[-1] if full.dim() else 1
    a, b = full.reshape(-1, c), other.reshape(-1, c)
    if rows is not None:
        a, b = a[rows], b[rows]
    n = a.shape[0]
    if n == 0:
        raise ValueError("no output positions to compare (empty batch or all positions masked)")
    acc = torch.zeros(4, dtype=torch.float64, device=a.device)
    step = max(1, chunk_elements // max(c, 1))
    for i in range(0, n, step):
        x, y = a[i:i + step].double(), b[i:i + step].double()  # tiny KLs need float64
        lp, lq = F.log_softmax(x, dim=-1), F.log_softmax(y, dim=-1)
        p = lp.exp()
        kl = torch.where(p > 0, p * (lp - lq), torch.zeros_like(p)).sum()
        cos = F.cosine_similarity(x, y, dim=-1).sum()
        se = (x - y).square().sum()
        agree = (x.argmax(-1) == y.argmax(-1)).sum()
        acc += torch.stack([kl.double(), cos.double(), se.double(), agree.double()])
    kl, cos, se, agree = acc.tolist()
    return {"kl": max(kl / n, 0.0), "cosine": cos / n, "mse": se / (n * c), "top1_agree": agree / n}


# -- weights ------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


_INT_VIEW = {2: torch.int16, 4: torch.int32, 8: torch.int64, 1: torch.uint8}


def bits_equal(a: torch.Tensor, b: torch.Tensor, chunk_elements: int = DEFAULT_CHUNK) -> bool:
    """True when two tensors hold the same bits (NaN payloads and signed zeros included), chunk by chunk
    on a's device."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    fa, fb = a.detach().reshape(-1), b.detach().reshape(-1)
    iv = _INT_VIEW.get(a.element_size()) if a.dtype.is_floating_point else None
    for s in range(0, fa.numel(), chunk_elements):
        x, y = fa[s:s + chunk_elements], fb[s:s + chunk_elements].to(fa.device)
        if iv is not None:
            x, y = x.view(iv), y.view(iv)
        if not torch.equal(x, y):
            return False
    return True


class WeightsNotRestoredError(RuntimeError):
    """The model's weights differ from their backup after the analysis (never expected)."""


@contextlib.contextmanager
def preserved_weights(params: Mapping[str, nn.Parameter], backup_device: Mapping[str, torch.device],
                      chunk_elements: int = DEFAULT_CHUNK) -> Iterator[ParameterSnapshot]:
    """Back up the parameters (exact copies), yield the backup, then restore and verify bit for bit."""
    backup = ParameterSnapshot({n: p.detach().to(backup_device[n], copy=True) for n, p in params.items()})
    try:
        yield backup
    finally:
        with torch.no_grad():
            for n, p in params.items():
                p.data.copy_(backup[n])
        bad = [n for n, p in params.items() if not bits_equal(p.data, backup[n], chunk_elements)]
        if bad:
            raise WeightsNotRestoredError(f"weights not restored exactly after sparse-quality analysis: {bad[:5]}")


def _write_masked(p: nn.Parameter, new: torch.Tensor, old: torch.Tensor, chunk: int,
                  keep_fn: Callable[[torch.Tensor, int], torch.Tensor]) -> torch.Tensor:
    """p <- where(keep, new, old), chunk by chunk on p's device; returns the kept count (device tensor)."""
    dev = p.device
    target = p.data.view(-1) if p.data.is_contiguous() else None
    new_f, old_f = new.reshape(-1), old.reshape(-1)
    kept = torch.zeros((), dtype=torch.float64, device=dev)
    pieces = []
    for s in range(0, new_f.numel(), chunk):
        nc = new_f[s:s + chunk].to(dev, non_blocking=True)
        oc = old_f[s:s + chunk].to(dev, non_blocking=True)
        keep = keep_fn(delta_chunk(nc, oc), s)
        val = torch.where(keep, nc, oc.to(nc.dtype))
        kept += keep.sum()
        if target is not None:
            target[s:s + chunk].copy_(val)
        else:
            pieces.append(val)
    if target is None and pieces:
        p.data.copy_(torch.cat(pieces).view(p.shape))
    return kept


_KEY = re.compile(r"^sparse/(?P<m>kl|cosine|mse|top1_agree|kept_ratio|unchanged_ratio)_at_(?P<t>[^_/]+)"
                  r"(?P<r>_random)?$")
_HELP = "outputs of the model with the updates |dw| <= threshold zeroed, against the fully updated model " \
        "(mask: magnitude, or a random mask of the same per-tensor density)"
OUTPUT_METRICS = {
    "kl": Metric("gradflow_sparse_kl_divergence", "gauge", f"KL divergence (nats) between the {_HELP}.",
                 labels=("threshold", "mask")),
    "cosine": Metric("gradflow_sparse_cosine_similarity", "gauge", f"Mean cosine similarity of the logits: {_HELP}.",
                     labels=("threshold", "mask")),
    "mse": Metric("gradflow_sparse_mse", "gauge", f"Mean squared error of the logits: {_HELP}.",
                  labels=("threshold", "mask")),
    "top1_agree": Metric("gradflow_sparse_top1_agreement_ratio", "gauge",
                         f"Fraction of positions whose top-1 prediction agrees: {_HELP}.", "1",
                         ("threshold", "mask")),
}
KEPT = Metric("gradflow_sparse_kept_ratio", "gauge",
              "Fraction of parameters kept (|dw| > threshold) by the sparse update.", "1", ("threshold",))
UNCHANGED = Metric("gradflow_sparse_unchanged_ratio", "gauge",
                   "Fraction of parameters left at their old value (|dw| <= threshold) by the sparse update.", "1",
                   ("threshold",))


class SparseQualityMetrics(MetricComputer):
    """Output quality of magnitude-sparsified updates, with a random-mask baseline of equal density."""

    name = "sparse_quality"
    requires_inputs = True
    catalogue = (*OUTPUT_METRICS.values(), KEPT, UNCHANGED)

    def __init__(self, thresholds: tuple[float, ...] | list[float] = DEFAULT_THRESHOLDS, include_random: bool = True,
                 max_samples: int = 8, seed: int = 0, chunk_elements: int = DEFAULT_CHUNK,
                 forward_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None) -> None:
        self.thresholds = tuple(sorted({float(t) for t in thresholds}))
        self.include_random = include_random
        self.max_samples = max_samples
        self.seed = seed
        self.chunk_elements = chunk_elements
        self.forward_fn = forward_fn

    def _outputs(self, model: nn.Module, batch: Any) -> torch.Tensor:
        out = self.forward_fn(model, batch) if self.forward_fn is not None else call_model(model, batch)
        return extract_logits(out).detach()

    def compute(self, delta: Any = None, snapshot: Any = None, context: Any = None, **kwargs: Any) -> dict[str, float]:
        model = getattr(context, "model", None)
        inputs = getattr(context, "inputs", None)
        if model is None or snapshot is None or inputs is None:
            raise ValueError("sparse quality needs the model, the snapshot and inputs")
        live = dict(model.named_parameters())
        names = [n for n in (delta.names if delta is not None else snapshot.names) if n in snapshot]
        missing = [n for n in names if n not in live]
        if missing:
            raise ParameterMismatchError(f"parameters of the delta are not in the model: {missing[:5]}; call reset()")
        params = {n: live[n] for n in names}
        ParameterSnapshot({n: snapshot[n] for n in names}, snapshot.step).check_matches(params)
        device = next(iter(params.values())).device if params else torch.device("cpu")
        batch = prepare_inputs(inputs, device, self.max_samples)
        step = int(getattr(context, "step", 0))
        out: dict[str, float] = {}
        chunk = self.chunk_elements
        with torch.no_grad(), _eval_mode(model), \
                preserved_weights(params, {n: snapshot[n].device for n in names}, chunk) as backup:
            full = self._outputs(model, batch)
            rows = _attention_rows(batch, full)
            gens: dict[torch.device, torch.Generator] = {}
            for t in self.thresholds:
                tag = format_threshold(t)
                kept = {n: _write_masked(p, backup[n], snapshot[n], chunk, lambda d, s, t=t: d.abs() > t)
                        for n, p in params.items()}
                total = sum(p.numel() for p in params.values())
                kept_ratio = float(sum(kept.values()).item()) / total if total else float("nan")
                out[f"sparse/kept_ratio_at_{tag}"] = kept_ratio
                out[f"sparse/unchanged_ratio_at_{tag}"] = 1.0 - kept_ratio
                for k, v in compare_outputs(full, self._outputs(model, batch), rows, chunk).items():
                    out[f"sparse/{k}_at_{tag}"] = v
                if not self.include_random:
                    continue
                for n, p in params.items():
                    if p.device not in gens:
                        gens[p.device] = torch.Generator(device=p.device).manual_seed(self.seed + step)
                    gen, frac = gens[p.device], kept[n] / max(p.numel(), 1)

                    def keep_random(d: torch.Tensor, s: int, gen: torch.Generator = gen,
                                    frac: torch.Tensor = frac) -> torch.Tensor:
                        return torch.rand(d.shape, generator=gen, device=d.device) < frac

                    _write_masked(p, backup[n], snapshot[n], chunk, keep_random)
                for k, v in compare_outputs(full, self._outputs(model, batch), rows, chunk).items():
                    out[f"sparse/{k}_at_{tag}_random"] = v
        return out

    def describe(self, key: str) -> tuple[Metric, dict[str, str]] | None:
        m = _KEY.match(key)
        if not m:
            return None
        kind, t = m.group("m"), m.group("t")
        if kind == "kept_ratio":
            return (KEPT, {"threshold": t}) if not m.group("r") else None
        if kind == "unchanged_ratio":
            return (UNCHANGED, {"threshold": t}) if not m.group("r") else None
        return OUTPUT_METRICS[kind], {"threshold": t, "mask": "random" if m.group("r") else "magnitude"}
