"""The series names Herald's metrics expose, for checking rules and dashboards."""

from __future__ import annotations

from prometheus_client.metrics import MetricWrapperBase

import consumer.metrics as metrics

SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
    "gauge": ("",),
    "summary": ("", "_count", "_sum", "_created"),
}


def exported_metric_names() -> set[str]:
    """Every series name of the metrics defined in consumer/metrics.py."""
    names: set[str] = set()
    for value in vars(metrics).values():
        if isinstance(value, MetricWrapperBase):
            base = value._name
            kind = value._type
            names.update(base + suffix for suffix in SUFFIXES[kind])
    assert names, "no metrics found in consumer.metrics"
    return names
