"""The module under test on its device and dtype, with the inputs, losses and forward calls analyses share.

`prepare_context` also runs one probe forward/backward pass so that a wrong shape or a dtype the
device cannot run is reported once, as a user error, before any analysis starts.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .config import AnalysisConfig
from .errors import DeviceError, DtypeError, InitCheckError, ShapeError
from .inputs import draw
from .losses import LOSSES
from .spec import Shape

TORCH_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


def resolve_dtype(name: str) -> torch.dtype:
    try:
        return TORCH_DTYPES[name]
    except KeyError:
        raise DtypeError(f"unknown dtype {name!r}: choose from {', '.join(TORCH_DTYPES)}") from None


def resolve_device(requested: str) -> tuple[torch.device, str | None]:
    """The device to run on and, when CUDA was asked for but is absent, the notice to print."""
    try:
        device = torch.device(requested)
    except (RuntimeError, TypeError):
        raise DeviceError(f"unknown device {requested!r}: use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return torch.device("cpu"), f"CUDA is not available; running on CPU instead of {requested!r}"
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DeviceError(
                f"device {requested!r} does not exist: {torch.cuda.device_count()} CUDA device(s)"
            )
        return device, None
    if device.type == "cpu":
        return device, None
    try:
        torch.zeros(1, device=device)
    except Exception as exc:
        raise DeviceError(f"device {requested!r} cannot be used: {first_line(exc)}") from None
    return device, None


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def output_tensors(out: Any) -> list[torch.Tensor]:
    """Every floating-point tensor in a module output (tensor, tuple, list, dict, dataclass-like)."""
    found: list[torch.Tensor] = []

    def visit(obj: Any) -> None:
        if isinstance(obj, torch.Tensor):
            if obj.is_floating_point() or obj.is_complex():
                found.append(obj)
        elif isinstance(obj, Mapping):
            for v in obj.values():
                visit(v)
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                visit(v)
        elif hasattr(obj, "__dict__") and not isinstance(obj, nn.Module):
            for v in vars(obj).values():
                visit(v)

    visit(out)
    return found


def primary_output(out: Any) -> torch.Tensor | None:
    """The first floating-point tensor of the output (MultiheadAttention: attn_output, not the weights)."""
    tensors = output_tensors(out)
    if not tensors:
        return None
    t = tensors[0]
    return t.real if t.is_complex() else t


def _call_style(module: nn.Module, names: list[str]) -> str:
    """Keyword call when every input name is a parameter of forward (query/key/value), else positional."""
    try:
        params = inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return "positional"
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()) and names != ["x"]:
        return "keyword"
    return "keyword" if all(n in params for n in names) else "positional"


@dataclass
class ModuleContext:
    """What every analysis needs: the module, how to feed it, and where it runs."""

    module: nn.Module
    spec: str
    module_kwargs: dict[str, Any]
    shapes: dict[str, Shape]
    device: torch.device
    dtype: torch.dtype
    config: AnalysisConfig
    call_style: str = "positional"

    # -- inputs and calls -------------------------------------------------------------------------
    def generator(self, offset: int) -> torch.Generator:
        """A generator seeded from the config seed, distinct per use site."""
        gen = torch.Generator(device=self.device)
        gen.manual_seed(int(self.config.seed) * 1_000_003 + offset)
        return gen

    def inputs(
        self, distribution: str = "normal", gen: torch.Generator | None = None, requires_grad: bool = False
    ) -> dict[str, torch.Tensor]:
        tensors = draw(self.shapes, distribution, gen or self.generator(0), self.device, self.dtype)
        if requires_grad:
            for t in tensors.values():
                t.requires_grad_(True)
        return tensors

    def call(self, inputs: Mapping[str, torch.Tensor]) -> Any:
        """Call the module as a user would (`module(...)`, so hooks fire)."""
        if self.call_style == "keyword":
            return self.module(**inputs)
        return self.module(*inputs.values())

    def forward(self, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The primary output tensor; raises if the module returns none."""
        out = primary_output(self.call(inputs))
        if out is None:
            raise InitCheckError(f"{self.spec} returned no floating-point tensor")
        return out

    def loss(
        self, name: str, out: torch.Tensor, inputs: dict[str, torch.Tensor], gen: torch.Generator
    ) -> torch.Tensor:
        return LOSSES[name](out, inputs, gen)

    # -- parameters -------------------------------------------------------------------------------
    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        yield from self.module.named_parameters()

    def trainable(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.module.named_parameters() if p.requires_grad]

    def matrices(self) -> list[tuple[str, nn.Parameter]]:
        """Parameters with at least two dimensions: the weights spectral and rank analyses look at."""
        return [(n, p) for n, p in self.module.named_parameters() if p.dim() >= 2]

    def zero_grad(self) -> None:
        for p in self.module.parameters():
            p.grad = None

    @property
    def finfo(self) -> torch.finfo:
        return torch.finfo(self.dtype)


def _place(module: nn.Module, device: torch.device, dtype: torch.dtype, spec: str) -> nn.Module:
    try:
        return module.to(device=device, dtype=dtype)
    except (RuntimeError, TypeError) as exc:
        msg = first_line(exc)
        if "dtype" in msg.lower() or "type" in msg.lower():
            raise DtypeError(f"{spec} cannot be cast to {dtype} on {device}: {msg}") from None
        raise DeviceError(f"{spec} cannot be moved to {device}: {msg}") from None


def _forward_backward(ctx: ModuleContext) -> None:
    inputs = ctx.inputs("normal", ctx.generator(0), requires_grad=True)
    out = ctx.forward(inputs)
    if out.requires_grad:
        out.float().sum().backward()
    ctx.zero_grad()


def _describe_shapes(shapes: Mapping[str, Shape]) -> str:
    return " ".join(f"{n}:{','.join(map(str, s))}" for n, s in shapes.items())


def probe(ctx: ModuleContext) -> None:
    """One forward/backward pass in train mode; a failure becomes a ShapeError or a DtypeError."""
    ctx.module.train()
    try:
        _forward_backward(ctx)
        return
    except InitCheckError:
        raise
    except Exception as exc:
        failure = exc
    finally:
        ctx.zero_grad()
    if ctx.dtype != torch.float32:
        reference = copy.deepcopy(ctx)
        reference.module = reference.module.float()
        reference.dtype = torch.float32
        try:
            _forward_backward(reference)
        except Exception:
            pass
        else:
            raise DtypeError(
                f"{ctx.spec} cannot run in {str(ctx.dtype).replace('torch.', '')} on {ctx.device}: "
                f"{first_line(failure)}"
            ) from None
    raise ShapeError(
        f"{ctx.spec} failed on inputs {_describe_shapes(ctx.shapes)} ({ctx.call_style} call): "
        f"{type(failure).__name__}: {first_line(failure)}"
    ) from None


def prepare_context(
    module: nn.Module,
    spec: str,
    module_kwargs: dict[str, Any],
    config: AnalysisConfig,
    device: torch.device,
) -> ModuleContext:
    """Move the module to device/dtype, decide how to call it and probe it once."""
    dtype = resolve_dtype(config.dtype)
    if device.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise DtypeError(f"bfloat16 is not supported on {torch.cuda.get_device_name(device)}")
    module = _place(module, device, dtype, spec)
    shapes = config.shapes
    ctx = ModuleContext(
        module=module,
        spec=spec,
        module_kwargs=dict(module_kwargs),
        shapes=shapes,
        device=device,
        dtype=dtype,
        config=config,
        call_style=_call_style(module, list(shapes)),
    )
    probe(ctx)
    return ctx
