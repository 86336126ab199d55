"""The package and the integrations module import without transformers or lightning installed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

PROBE = """
import sys
for name in ("transformers", "accelerate", "lightning", "pytorch_lightning"):
    sys.modules[name] = None  # as if not installed: importing it raises ImportError
import gradflow_agent, gradflow_agent.integrations, gradflow_agent.dynamics
print(sorted(gradflow_agent.integrations.__all__))
for name in ("GradflowCallback", "GradflowLightningCallback"):
    try:
        getattr(gradflow_agent.integrations, name)
    except ImportError as exc:
        print(name, "->", exc)
"""


def test_imports_without_the_frameworks():
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "['AttentionPlugin', 'GradflowCallback', 'GradflowLightningCallback']"
    assert lines[1] == ("GradflowCallback -> gradflow_agent.integrations.GradflowCallback needs the hf extra: "
                        "pip install 'gradflow-agent[hf]'")
    assert lines[2] == ("GradflowLightningCallback -> gradflow_agent.integrations.GradflowLightningCallback needs "
                        "the lightning extra: pip install 'gradflow-agent[lightning]'")
    assert "transformers" not in out.stderr


def test_an_unknown_name_is_an_attribute_error():
    import gradflow_agent.integrations as integrations

    with pytest.raises(AttributeError, match="NoSuchCallback"):
        integrations.NoSuchCallback  # noqa: B018
