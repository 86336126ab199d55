"""The Issue record and the advice attached to each kind."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from .spec import KINDS, SEVERITIES  # noqa: F401 - defined once, in the rule table

RECOMMENDATIONS = {
    "vanishing": "Gradients die before reaching this layer: use a variance-preserving initialisation "
                 "(kaiming for ReLU, xavier for tanh), add normalisation or residual connections, "
                 "replace saturating activations, or raise the learning rate of early layers.",
    "exploding": "Gradients grow without bound: lower the learning rate, clip gradients "
                 "(torch.nn.utils.clip_grad_norm_), check the initialisation gain and add normalisation.",
    "dead": "Most units of this ReLU-family layer never fire: lower the learning rate, initialise biases "
            "at zero or slightly positive, use LeakyReLU/GELU, or add normalisation before it.",
    "nonfinite": "NaN/Inf appeared here first: look for log(0), division by zero or overflow in this "
                 "layer and its input; lower the learning rate, use a GradScaler with fp16, clip "
                 "gradients, and check the data batch.",
    "unstable": "Gradient magnitude swings widely between steps: lower the learning rate, increase the "
                "batch size, add warmup or gradient clipping, and check for outlier batches.",
    "saturated": "Most outputs sit at the bounds of the activation, where its gradient is ~0: reduce "
                 "the initialisation scale, normalise the pre-activations, or use a non-saturating "
                 "activation.",
    "stalled": "Updates are negligible relative to the weights: the learning rate is too small (or zero) "
               "for this layer, the layer is missing from the optimizer, or updates underflow the "
               "parameter dtype.",
}


@dataclass(frozen=True)
class Issue:
    """One finding of the in-process detector, on one layer at one step."""

    kind: str
    layer: str
    severity: str
    value: float
    threshold: float
    step: int
    message: str
    recommendation: str
    first_step: int | None = None  # when the condition started, where known (nonfinite: the first NaN/Inf)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["value"] = None if not math.isfinite(self.value) else self.value
        return d

    def __str__(self) -> str:
        return f"[{self.severity}] {self.kind} at {self.layer} (step {self.step}): {self.message}"

    def _repr_html_(self) -> str:
        """Jupyter's view: a one-row issue table (escaped: layer names may hold `<`)."""
        from ..report.html import issues_html
        return issues_html([self], title=f"{self.kind} at {self.layer}")


class IssueList(list):
    """`agent.issues()`: a plain list of Issue that a notebook shows as a table."""

    def _repr_html_(self) -> str:
        from ..report.html import issues_html
        return issues_html(self)
