"""Read a Prometheus endpoint as the tests' numbers: samples by name and labels (parsed by prometheus_client)."""

from __future__ import annotations

from dataclasses import dataclass

import httpx
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families


@dataclass(frozen=True)
class Scrape:
    text: str
    samples: list[tuple[str, dict[str, str], float]]

    def value(self, name: str, **labels: str) -> float:
        """The sum of the samples called `name` whose labels include `labels` (0 when there is none)."""
        return sum(v for n, ls, v in self.samples if n == name and labels.items() <= ls.items())

    def llmbus(self) -> list[tuple[str, dict[str, str], float]]:
        return [sample for sample in self.samples if sample[0].startswith("llmbus_")]


def parse(text: str) -> Scrape:
    samples = [(s.name, dict(s.labels), s.value) for f in text_string_to_metric_families(text) for s in f.samples]
    return Scrape(text, samples)


async def scrape(url: str, **client_options: object) -> Scrape:
    async with httpx.AsyncClient(trust_env=False, timeout=10, **client_options) as client:
        response = await client.get(url)
    response.raise_for_status()
    assert response.headers["content-type"].startswith("text/plain"), response.headers
    return parse(response.text)


def compile_states(registry: CollectorRegistry) -> dict[str, float]:
    """`llmbus_decode_compile_state` of a worker's registry, by state."""
    [family] = [f for f in registry.collect() if f.name == "llmbus_decode_compile_state"]
    return {sample.labels["state"]: sample.value for sample in family.samples}
