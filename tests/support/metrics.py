"""GET /metrics read with prometheus-client's own parser: every sample, by name and labels."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from tests.support.servers import Service

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(service: Service) -> Samples:
    """Every sample of one /metrics answer, keyed by (name, sorted labels)."""
    response = service.get("/metrics")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain; version=")
    out: Samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def total(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def per_worker(samples: Samples, name: str) -> dict[str, float]:
    """A liveall gauge's series: pid -> value."""
    return {dict(labels)["pid"]: value for (n, labels), value in samples.items() if n == name}


def summed(samples: Samples, name: str) -> float:
    """A metric's samples added up over all their labels."""
    return sum(value for (n, _), value in samples.items() if n == name)
