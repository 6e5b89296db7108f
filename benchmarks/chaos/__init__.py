"""Chaos and soak runs of the example app: faults under an open-loop load, from outside.

``python -m benchmarks.chaos`` (``make chaos``) and ``python -m benchmarks.chaos.soak``
(``make soak``) start a private redis-server, the example's flaky upstream, two example-app
processes and nginx in front of them, all on loopback; a second process sends requests at a
fixed rate (``benchmarks.chaos.load``) while faults are injected. See docs/reliability.md and
ADR 0074.
"""
