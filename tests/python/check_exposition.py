"""Parses a /metrics page with the Prometheus project's own text parser.

Usage: check_exposition.py URL

Fails (non-zero exit) when the page is not valid Prometheus text exposition,
when a family lacks HELP, or when a name breaks the naming conventions
(counters end in _total, units are base units). Prints every sample as
`name{labels} value`, sorted, so the caller can check the numbers.
"""

import sys
import urllib.request

from prometheus_client.parser import text_string_to_metric_families


def main() -> None:
    url = sys.argv[1]
    with urllib.request.urlopen(url, timeout=10) as response:
        content_type = response.headers.get("Content-Type", "")
        text = response.read().decode("utf-8")
    assert content_type.startswith("text/plain"), f"content type {content_type!r}"
    families = list(text_string_to_metric_families(text))
    assert families, "no metric families"
    names = set()
    for family in families:
        assert family.name.startswith("herald_"), f"{family.name}: not in the herald_ namespace"
        assert family.name not in names, f"{family.name}: family repeated"
        names.add(family.name)
        assert family.documentation, f"{family.name}: no HELP text"
        assert family.type in ("counter", "gauge", "histogram"), f"{family.name}: type {family.type}"
        for unit in ("_ms", "_milliseconds", "_kb", "_mb", "_micros"):
            assert unit not in family.name, f"{family.name}: use base units (seconds, bytes)"
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            print(f"{sample.name}{{{labels}}} {sample.value}")
            if family.type == "counter":
                assert sample.name.endswith(("_total", "_created")), f"{sample.name}: counters end in _total"
                assert sample.value >= 0, f"{sample.name}: negative counter"


if __name__ == "__main__":
    main()
