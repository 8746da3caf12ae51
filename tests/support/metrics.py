"""A parsed ``/metrics`` scrape of a running service."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from tests.support.service import Running

Labels = dict[str, str]


class Scrape:
    """One parsed scrape: sample values by name and labels."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.samples: list[tuple[str, Labels, float]] = []
        self.types: dict[str, str] = {}
        for family in text_string_to_metric_families(text):
            self.types[family.name] = family.type
            for s in family.samples:
                self.samples.append((s.name, dict(s.labels), s.value))

    def value(self, name: str, **labels: str) -> float:
        """The sample's value; 0 if absent (a labelled counter not yet incremented)."""
        found = [v for n, lab, v in self.samples if n == name and lab == labels]
        assert len(found) <= 1, (name, labels, found)
        return found[0] if found else 0.0

    def names(self) -> set[str]:
        return {n for n, _, _ in self.samples}

    def label_values(self) -> set[str]:
        return {v for _, lab, _ in self.samples for v in lab.values()}


async def scrape(svc: Running, accept: str | None = None) -> Scrape:
    r = await svc.client.get("/metrics", headers={"Accept": accept} if accept else {})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
    return Scrape(r.text)
