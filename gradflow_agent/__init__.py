"""gradflow_agent: gradient-health observability for PyTorch training.

    agent = gradflow_agent.attach(model)   # hooks, on-device statistics, Prometheus /metrics
"""

__version__ = "0.1.0"

from .agent import Agent, attach  # noqa: E402
from .config import ConfigError, load_config  # noqa: E402
from .detect import Issue  # noqa: E402
from .snapshot import Snapshot  # noqa: E402

__all__ = ["Agent", "ConfigError", "Issue", "Snapshot", "attach", "load_config", "__version__"]
