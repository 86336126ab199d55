"""Helpers shared by the test suites (real Prometheus servers and the like)."""
