"""`AnalysisRunner` builds the module once, runs the enabled analyses and hands results to the reports.

An analysis that does not apply returns a skipped result; one that raises is recorded as a failed
result with the exception's first line, and the run goes on with the next analysis.
"""

from __future__ import annotations

import copy
import sys
import traceback
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import torch
from torch import nn

from .._optional import require
from . import report
from .analyses import ANALYSES, AnalysisInfo
from .config import AnalysisConfig
from .context import ModuleContext, first_line, prepare_context, resolve_device
from .errors import InitCheckError, SpecError
from .result import AnalysisResult
from .spec import build_module, load_module_class, parse_module_spec

tqdm = require("tqdm", "initcheck", "gradflow_agent.initcheck").tqdm


def _spec_of(cls: type) -> str:
    return f"{cls.__module__}@{cls.__qualname__}"


class AnalysisRunner:
    """Run the initialization analyses on one module (a spec string, a class, or an instance)."""

    def __init__(
        self,
        spec_or_module: str | type[nn.Module] | nn.Module,
        config: AnalysisConfig | None = None,
        module_kwargs: Mapping[str, Any] | None = None,
        *,
        stderr: IO[str] | None = None,
    ) -> None:
        self.config = config or AnalysisConfig()
        self.module_kwargs = dict(module_kwargs or {})
        self._stderr = stderr
        if isinstance(spec_or_module, nn.Module):
            if self.module_kwargs:
                raise InitCheckError("module_kwargs apply to a spec or a class, not to a module instance")
            self.spec = _spec_of(type(spec_or_module))
            try:  # analyses move the module and touch .grad: work on a copy, leave the caller's as it is
                module = copy.deepcopy(spec_or_module)
            except Exception:
                module = spec_or_module
        elif isinstance(spec_or_module, type) and issubclass(spec_or_module, nn.Module):
            self.spec = _spec_of(spec_or_module)
            module = build_module(spec_or_module, self.module_kwargs, self.config.seed)
        elif isinstance(spec_or_module, str):
            self.spec = parse_module_spec(spec_or_module).text
            cls = load_module_class(spec_or_module)
            module = build_module(cls, self.module_kwargs, self.config.seed)
        else:
            raise SpecError(f"expected a module spec, class or instance, got {type(spec_or_module).__name__}")
        self.requested_device = self.config.device
        self.device, self.device_notice = resolve_device(self.config.device)
        if self.device_notice:
            self._notify(f"notice: {self.device_notice}")
        self.ctx: ModuleContext = prepare_context(
            module, self.spec, self.module_kwargs, self.config, self.device
        )

    # -- plumbing -----------------------------------------------------------------------------------
    @property
    def module(self) -> nn.Module:
        """The module under analysis, on the analysis device and dtype."""
        return self.ctx.module

    def _notify(self, line: str) -> None:
        if not self.config.quiet:
            print(line, file=self._stderr or sys.stderr, flush=True)

    def _show_progress(self) -> bool:
        if self.config.quiet:
            return False
        if self.config.progress is not None:
            return self.config.progress
        stream = self._stderr or sys.stderr
        return bool(getattr(stream, "isatty", lambda: False)())

    def selected(self) -> list[AnalysisInfo]:
        """The analyses whose `run_*` switch is on, in registry order."""
        return [info for info in ANALYSES.values() if self.config.enabled(info.switch)]

    # -- running ------------------------------------------------------------------------------------
    def run_one(self, analysis_id: str) -> list[AnalysisResult]:
        """Run one analysis by id; an exception becomes a failed result instead of ending the run."""
        if analysis_id not in ANALYSES:
            raise InitCheckError(f"unknown analysis {analysis_id!r}: choose from {', '.join(ANALYSES)}")
        info = ANALYSES[analysis_id]
        was_training = self.module.training
        try:
            results = info.run(self.ctx)
        except Exception as exc:
            if self.config.debug:
                traceback.print_exc(file=self._stderr or sys.stderr)
            detail = (
                str(exc) if isinstance(exc, InitCheckError) else f"{type(exc).__name__}: {first_line(exc)}"
            )
            results = [AnalysisResult(info.id, None, False, f"analysis failed: {detail}", "error", info.id)]
        finally:
            self.ctx.zero_grad()
            self.module.train(was_training)
        return results

    def run_all(self) -> list[AnalysisResult]:
        """Run every enabled analysis, with a progress bar on stderr when it is a terminal."""
        selected = self.selected()
        results: list[AnalysisResult] = []
        bar = tqdm(
            selected,
            desc="init-check",
            unit="analysis",
            file=self._stderr or sys.stderr,
            disable=not self._show_progress(),
            leave=False,
        )
        for info in bar:
            bar.set_postfix_str(info.id)
            results.extend(self.run_one(info.id))
        bar.close()
        return results

    # -- reporting ----------------------------------------------------------------------------------
    def metadata(self) -> dict[str, Any]:
        """Everything about the run that is not a result: module, inputs, device, dtype, settings."""
        module = self.module
        cls = type(module)
        return {
            "module": {
                "spec": self.spec,
                "class": f"{cls.__module__}.{cls.__qualname__}",
                "kwargs": self.module_kwargs,
                "n_parameters": sum(p.numel() for p in module.parameters()),
                "n_trainable": sum(p.numel() for p in module.parameters() if p.requires_grad),
            },
            "input_shapes": {k: list(v) for k, v in self.ctx.shapes.items()},
            "call_style": self.ctx.call_style,
            "device": str(self.device),
            "requested_device": self.requested_device,
            "device_notice": self.device_notice,
            "dtype": self.config.dtype,
            "n_samples": self.config.n_samples,
            "loss_fns": list(self.config.loss_fns),
            "seed": self.config.seed,
            "power_iterations": self.config.power_iterations,
            "enabled_analyses": [info.id for info in self.selected()],
            "healthy_ranges": self.config.ranges.to_dict(),
            "versions": {"torch": torch.__version__, "gradflow_agent": report.package_version()},
        }

    def report(self, results: Sequence[AnalysisResult]) -> dict[str, Any]:
        """The JSON document (see docs/init-check.md for the schema)."""
        return report.build_report(self.metadata(), results)

    def print_summary(self, results: Sequence[AnalysisResult], file: IO[str] | None = None) -> None:
        report.print_summary(self.report(results), file=file)

    def save_json(self, results: Sequence[AnalysisResult], path: str | Path) -> Path:
        return report.save_json(self.report(results), path)

    def save_markdown(self, results: Sequence[AnalysisResult], path: str | Path) -> Path:
        return report.save_markdown(self.report(results), path)


def run_analysis(
    spec_or_module: str | type[nn.Module] | nn.Module,
    input_shapes: Mapping[str, Sequence[int]] | Sequence[int] | None = None,
    device: str = "cuda",
    dtype: str = "float32",
    module_kwargs: Mapping[str, Any] | None = None,
    config: AnalysisConfig | None = None,
    **config_fields: Any,
) -> list[AnalysisResult]:
    """One call: build the module, run every enabled analysis, return the results.

    `config_fields` are any other `AnalysisConfig` fields (n_samples, loss_fns, run_lipschitz=False, ...).
    """
    if config is None:
        config = AnalysisConfig(
            input_shapes=input_shapes if input_shapes is not None else {"x": (2, 16)},
            device=device,
            dtype=dtype,
            **config_fields,
        )
    return AnalysisRunner(spec_or_module, config, module_kwargs).run_all()
