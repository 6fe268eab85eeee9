"""Classification of a generic HTTP endpoint's answers (consumer/providers/http.py)."""

from __future__ import annotations

import pytest

from consumer.errors import RETRYABLE_BY_DEFAULT, DeliveryError, ErrorType
from consumer.providers.http import classify_http_status


@pytest.mark.parametrize(
    ("status", "error_type", "retryable"),
    [
        (401, ErrorType.ACCESS_TOKEN, False),
        (403, ErrorType.PERMISSION, False),
        (408, ErrorType.PROVIDER_ERROR, True),
        (425, ErrorType.PROVIDER_ERROR, True),
        (429, ErrorType.RATE_LIMIT, True),
        (500, ErrorType.PROVIDER_ERROR, True),
        (502, ErrorType.PROVIDER_ERROR, True),
        (503, ErrorType.PROVIDER_ERROR, True),
        (504, ErrorType.PROVIDER_ERROR, True),
        (599, ErrorType.PROVIDER_ERROR, True),
        (400, ErrorType.INVALID_REQUEST, False),
        (404, ErrorType.INVALID_REQUEST, False),
        (405, ErrorType.INVALID_REQUEST, False),
        (409, ErrorType.INVALID_REQUEST, False),
        (410, ErrorType.INVALID_REQUEST, False),
        (413, ErrorType.INVALID_REQUEST, False),
        (422, ErrorType.INVALID_REQUEST, False),
        (499, ErrorType.INVALID_REQUEST, False),
        (300, ErrorType.OTHER, False),
        (301, ErrorType.OTHER, False),
        (302, ErrorType.OTHER, False),
        (307, ErrorType.OTHER, False),
        (308, ErrorType.OTHER, False),
        (100, ErrorType.OTHER, False),
    ],
)
def test_classify_http_status(status: int, error_type: ErrorType, retryable: bool) -> None:
    assert classify_http_status(status) == (error_type, retryable)


@pytest.mark.parametrize("status", range(400, 600))
def test_every_error_status_is_classified_consistently(status: int) -> None:
    error_type, retryable = classify_http_status(status)
    assert isinstance(error_type, ErrorType)
    # Only transient kinds are retried, and every 5xx is one of them.
    assert retryable == (error_type in RETRYABLE_BY_DEFAULT)
    if status >= 500:
        assert retryable


@pytest.mark.parametrize("status", [401, 403])
def test_auth_failures_are_not_retried_by_default(status: int) -> None:
    error_type, retryable = classify_http_status(status)
    error = DeliveryError(error_type, f"HTTP {status}", code=str(status), retryable=retryable)
    assert error.retryable is False
    assert error.error_type in (ErrorType.ACCESS_TOKEN, ErrorType.PERMISSION)


def test_rate_limit_delivery_error_keeps_its_retry_after() -> None:
    error_type, retryable = classify_http_status(429)
    error = DeliveryError(error_type, "HTTP 429", code="429", retry_after=12.0,
                          retryable=retryable)
    assert error.retryable is True
    assert "retry_after=12s" in repr(error)
    assert "rate_limit" in repr(error)
