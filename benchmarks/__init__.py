"""Benchmarks of fastapi-resilience side by side with its peers: ``python -m benchmarks.run``."""

from __future__ import annotations
