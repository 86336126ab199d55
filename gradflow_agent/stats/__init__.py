"""On-device statistics: activations (forward hooks), gradients and parameters (step boundary)."""
