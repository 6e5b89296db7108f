"""Reading ``/metrics`` as Prometheus would: prometheus-client's own text parser."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of the exposition, by its name and labels."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(text: str, metric: str, /, **labels: str) -> float:
    """The sample ``metric`` with exactly ``labels``; 0 when it is not there (yet)."""
    return samples(text).get((metric, frozenset(labels.items())), 0.0)


def family_names(text: str) -> set[str]:
    """The family names (a counter's without ``_total``)."""
    return {family.name for family in text_string_to_metric_families(text)}
