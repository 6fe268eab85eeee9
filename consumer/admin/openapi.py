"""The OpenAPI 3.1 document of the admin API (:mod:`consumer.admin.api`).

Served at ``/admin/openapi.json`` behind the same bearer token as every other
admin route: one rule for the whole of ``/admin/`` is easier to reason about
than an exception, and the document is also committed as
``docs/admin-api.openapi.json`` (by :mod:`consumer.contracts`) for anyone
without a token. A test checks that its operations are exactly the routes the
API registers, and schemathesis checks the running API against it.
"""

from __future__ import annotations

import copy
import typing
from typing import Any

from consumer import __version__
from schemas.parking import PARKED_CHANNELS, ErrorTypeName
from schemas.send_request import CHANNELS

_ERROR_TYPES: list[str] = list(typing.get_args(ErrorTypeName))


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(*statuses: int) -> dict[str, Any]:
    """401 and 400 on every route (400 also comes, as text, from the HTTP server itself
    when a request is malformed, e.g. a request line over 8 KiB), and ``statuses``."""
    why = {403: "The token's role (viewer) may not do this; refused and audited.",
           404: "No such parked message, campaign, job or escalation.",
           409: "Another pass over the parking queue is running; try again shortly."}
    answers = {
        "400": {"description": "A parameter or the body is invalid (the message says "
                               "which), or the request is malformed.",
                "content": {"application/json": {"schema": _ref("Error")},
                            "text/plain": {"schema": {"type": "string"}}}},
        "401": _json(_ref("Error"), "No token, or a wrong one. Nothing was done."),
    }
    return answers | {str(s): _json(_ref("Error"), why[s]) for s in statuses}


def _query(name: str, schema: dict[str, Any], description: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "schema": schema,
            "description": description, **extra}


def _path_id(description: str) -> dict[str, Any]:
    return {"name": "id", "in": "path", "required": True,
            "schema": {"type": "string", "minLength": 1, "maxLength": 200},
            "description": description}


_TIME = {"type": "string", "format": "date-time"}
_FLAG = {"type": "string", "enum": ["true", "false", "1", "0"]}
_TEXT = {"type": "string", "minLength": 1, "maxLength": 2048}
_TEXTS = {"type": "array", "items": _TEXT, "maxItems": 1000}

_SCHEMAS: dict[str, Any] = {
    "Error": {"type": "object", "required": ["error"],
              "properties": {"error": {"type": "string"}}},
    "ParkedRow": {
        "type": "object",
        "required": ["id", "channel", "attempts", "error_type", "parked_at", "state"],
        "properties": {
            "id": {"type": "string", "format": "uuid"},
            "message_id": {"type": ["string", "null"]},
            "channel": {"type": "string"},
            "recipient": {"type": ["string", "null"],
                          "description": "Masked unless revealed."},
            "campaign_id": {"type": ["string", "null"]},
            "attempts": {"type": "integer"},
            "error_type": {"type": "string"},
            "error_code": {"type": ["string", "null"]},
            "last_error": {"type": ["string", "null"]},
            "parked_at": {"type": "string", "format": "date-time"},
            "state": {"type": "string"},
        },
    },
    "Listing": {
        "type": "object",
        "required": ["total", "by_error_type", "limit", "offset", "items"],
        "properties": {
            "total": {"type": "integer", "description": "Parked messages matching."},
            "by_error_type": {"type": "object", "additionalProperties": {"type": "integer"}},
            "limit": {"type": "integer"},
            "offset": {"type": "integer"},
            "items": {"type": "array", "items": _ref("ParkedRow")},
        },
    },
    "Shown": {
        "type": "object", "required": ["parked", "history"],
        "description": "A parked message: its index row, original body and headers, and its "
                       "history (attempts, provider events, parkings, operator actions).",
        "properties": {"parked": {"type": "object"},
                       "history": {"type": "array", "items": {"type": "object"}}},
    },
    "Status": {
        "type": "object",
        "required": ["channels", "in_flight", "paused", "queues", "parked"],
        "properties": {
            "instance": {"type": "string"},
            "roles": {"type": "array", "items": {"type": "string"}},
            "prefix": {"type": "string"},
            "stopping": {"type": "boolean"},
            "channels": {"type": "object", "additionalProperties": {"type": "object"},
                         "description": "Per channel: consuming, in_flight, mode, why "
                                        "paused, rate in force."},
            "in_flight": {"type": "integer"},
            "paused": {"type": "object", "additionalProperties": {"type": "string"}},
            "queues": {"type": "object", "additionalProperties": {
                "type": "object", "properties": {"messages": {"type": "integer"},
                                                 "consumers": {"type": "integer"}}}},
            "parked": {"type": "object"},
        },
    },
    "Stats": {"type": "object", "description": "Totals by status, first-attempt success, "
                                               "retries by attempt, failures by error_type."},
    "RetryRules": {
        "type": "object", "required": ["operator", "campaign", "builtin", "builtin_enabled"],
        "description": "The operator's rules, the campaign's (when asked), and the shipped "
                       "ones (each marked when an operator's rule replaces it).",
        "properties": {"operator": {"type": "array", "items": {"type": "object"}},
                       "campaign": {"type": "array", "items": {"type": "object"}},
                       "builtin": {"type": "array", "items": {"type": "object"}},
                       "builtin_enabled": {"type": "boolean"}}},
    "Escalation": {
        "type": "object",
        "required": ["id", "name", "target_channel", "target", "window_s"],
        "properties": {
            "id": {"type": "integer"}, "name": {"type": "string"},
            "channel": {"type": ["string", "null"]}, "error_type": {"type": ["string", "null"]},
            "campaign_id": {"type": ["string", "null"]},
            "target_channel": {"enum": list(CHANNELS)},
            "target": {"type": "string", "description": "Masked: a URL cut to its host, a "
                                                        "number masked."},
            "window_s": {"type": "integer"},
            "created_at": {"type": "string", "format": "date-time"},
            "created_by": {"type": "string"}}},
    "Escalations": {
        "type": "object", "required": ["rules", "digests"],
        "properties": {"rules": {"type": "array", "items": _ref("Escalation")},
                       "digests": {"type": "array", "items": {"type": "object"},
                                   "description": "The latest digests, newest first."}}},
    "EscalationRequest": {
        "type": "object", "required": ["name", "to_channel", "to"],
        "properties": {
            "name": {"type": "string", "minLength": 1, "maxLength": 100},
            "to_channel": {"enum": list(CHANNELS), "description": "How to reach the person."},
            "to": {**_TEXT, "description": "A URL (e.g. a chat's incoming webhook), an E.164 "
                                           "number or a PSID."},
            "window_s": {"type": "integer", "minimum": 1, "maximum": 86400, "default": 300,
                         "description": "One digest per window of this many seconds."},
            "channel": {"enum": list(CHANNELS), "description": "Only this channel."},
            "error_type": {"enum": _ERROR_TYPES, "description": "Only this error type."},
            "campaign": {"type": "string", "minLength": 1, "maxLength": 200,
                         "description": "Only this campaign."}}},
    "Campaign": {"type": "object", "required": ["campaign", "stats"],
                 "properties": {"campaign": {"type": ["object", "null"]},
                                "stats": _ref("Stats")}},
    "ReplayRequest": {
        "type": "object",
        "description": "Which parked messages to replay: ids, or filters, or all; and how.",
        "properties": {
            "ids": {**_TEXTS, "description": "Parked ids, or unambiguous prefixes of them."},
            "error_types": {"type": "array", "items": {"enum": _ERROR_TYPES}},
            "channel": {"enum": list(PARKED_CHANNELS)},
            "campaign": _TEXT,
            "recipient": _TEXT,
            "since": _TIME,
            "until": _TIME,
            "all": {"type": "boolean", "description": "Replay every parked message."},
            "dry_run": {"type": "boolean", "description": "Say what would be replayed."},
            "rate": {"type": "number", "exclusiveMinimum": 0,
                     "description": "Messages per second."},
            "reset_attempts": {"type": "boolean", "default": True,
                               "description": "Give replayed messages a fresh attempt "
                                              "budget."},
            "set_body": {"type": "string", "description": "A new body (one id only); "
                                                           "recorded as an edit."},
            "error_code": _TEXT,
            "background": {"type": "boolean", "description": "Run it as a background job "
                                                              "and answer 202 with the job."},
        },
    },
    "Job": {"type": "object", "required": ["id", "kind", "state"],
            "description": "A background job on the parking lot (replay, reject, purge).",
            "properties": {"id": {"type": "integer"}, "kind": {"type": "string"},
                           "state": {"type": "string"}}},
    "Jobs": {"type": "object", "required": ["jobs"],
             "properties": {"jobs": {"type": "array", "items": _ref("Job")}}},
    "RejectRequest": {
        "type": "object", "required": ["ids"],
        "properties": {"ids": {**_TEXTS, "minItems": 1},
                       "reason": {"type": "string", "maxLength": 2000}},
    },
    "Report": {"type": "object", "description": "What the pass did, counted."},
}


def _paths() -> dict[str, Any]:
    selection = [
        _query("channel", {"enum": list(PARKED_CHANNELS)}, "Only this channel."),
        _query("error_type", {"type": "array", "items": {"enum": _ERROR_TYPES}},
               "Only these error types (repeat the parameter, or separate with commas).",
               style="form", explode=True),
        _query("error_code", _TEXT, "Only this error code."),
        _query("campaign", _TEXT, "Only this campaign."),
        _query("recipient", _TEXT, "Only this recipient."),
        _query("since", _TIME, "Parked at or after (ISO 8601 with a zone)."),
        _query("until", _TIME, "Parked before (ISO 8601 with a zone)."),
    ]
    return {
        "/admin/status": {"get": {
            "operationId": "status", "summary": "Consumers, pauses, in-flight, queues",
            "responses": {"200": _json(_ref("Status"), "This process and the broker now."),
                          **_errors()}}},
        "/admin/parked": {"get": {
            "operationId": "listParked", "summary": "List parked messages",
            "parameters": [
                *selection,
                _query("limit", {"type": "integer", "minimum": 0, "maximum": 1000,
                                 "default": 50}, "Page size."),
                _query("offset", {"type": "integer", "minimum": 0, "maximum": 10**9,
                                  "default": 0}, "Rows to skip."),
                _query("newest_first", _FLAG, "Newest first (default: queue order)."),
            ],
            "responses": {"200": {
                **_json(_ref("Listing"), "One page, and counts."),
                "links": {"showFirst": {
                    "operationId": "showParked",
                    "parameters": {"id": "$response.body#/items/0/id"},
                    "description": "The first parked message of the page."}}},
                          **_errors()}}},
        "/admin/parked/{id}": {"get": {
            "operationId": "showParked", "summary": "One parked message and its history",
            "parameters": [_path_id("A parked id or an unambiguous prefix of one."),
                           _query("reveal", _FLAG, "Show recipients unmasked.")],
            "responses": {"200": _json(_ref("Shown"), "The message."),
                          **_errors(404)}}},
        "/admin/parked/replay": {"post": {
            "operationId": "replayParked", "summary": "Replay parked messages",
            "requestBody": {"required": True, "content": {
                "application/json": {"schema": _ref("ReplayRequest")}}},
            "responses": {"200": _json(_ref("Report"), "Replayed (or, dry run, would be)."),
                          "202": _json(_ref("Job"), "Queued as a background job."),
                          **_errors(403, 404, 409)}}},
        "/admin/parked/reject": {"post": {
            "operationId": "rejectParked", "summary": "Reject parked messages for good",
            "requestBody": {"required": True, "content": {
                "application/json": {"schema": _ref("RejectRequest")}}},
            "responses": {"200": _json(_ref("Report"), "Rejected: status cancelled."),
                          **_errors(403, 404, 409)}}},
        "/admin/jobs": {"get": {
            "operationId": "listJobs", "summary": "Background jobs: active, then recent",
            "responses": {"200": _json(_ref("Jobs"), "The jobs."), **_errors()}}},
        "/admin/jobs/{id}": {"get": {
            "operationId": "showJob", "summary": "One background job and its progress",
            "parameters": [_path_id("The job id.")],
            "responses": {"200": _json(_ref("Job"), "The job."), **_errors(404)}}},
        "/admin/jobs/{id}/cancel": {"post": {
            "operationId": "cancelJob", "summary": "Ask a background job to stop",
            "parameters": [_path_id("The job id.")],
            "responses": {"200": _json(_ref("Job"), "The job, cancel requested."),
                          **_errors(403, 404)}}},
        "/admin/stats": {"get": {
            "operationId": "stats", "summary": "Delivery and retry statistics",
            "parameters": [_query("campaign", _TEXT, "Only this campaign.")],
            "responses": {"200": _json(_ref("Stats"), "The figures."),
                          **_errors(404)}}},
        "/admin/campaigns/{id}": {"get": {
            "operationId": "campaign", "summary": "A campaign's settings and statistics",
            "parameters": [_path_id("The campaign id.")],
            "responses": {"200": _json(_ref("Campaign"), "The campaign."),
                          **_errors(404)}}},
        "/admin/retry-rules": {"get": {
            "operationId": "retryRules", "summary": "Retry rules per error type or code",
            "parameters": [_query("campaign", _TEXT, "Also this campaign's rules.")],
            "responses": {"200": _json(_ref("RetryRules"), "The rules."), **_errors()}}},
        "/admin/escalations": {
            "get": {
                "operationId": "listEscalations",
                "summary": "Who is told about parked messages, and the latest digests",
                "responses": {"200": _json(_ref("Escalations"), "The rules and digests."),
                              **_errors()}},
            "post": {
                "operationId": "addEscalation", "summary": "Add an escalation rule",
                "requestBody": {"required": True, "content": {
                    "application/json": {"schema": _ref("EscalationRequest")}}},
                "responses": {"201": _json(_ref("Escalation"), "The rule, target masked."),
                              **_errors(403)}}},
        "/admin/escalations/{id}": {"delete": {
            "operationId": "removeEscalation", "summary": "Remove an escalation rule",
            "parameters": [_path_id("The rule's id or name.")],
            "responses": {"200": _json(_ref("Escalation"), "The rule removed."),
                          **_errors(403, 404)}}},
        "/admin/openapi.json": {"get": {
            "operationId": "openapi", "summary": "This document",
            "responses": {"200": _json({"type": "object"}, "OpenAPI 3.1."), **_errors()}}},
    }


def document() -> dict[str, Any]:
    """The whole OpenAPI document (a fresh copy each call)."""
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Herald admin API",
            "version": __version__,
            "description": "Inspect and act on Herald's parking lot, statistics and "
                           "status. Served under /admin/ by the gateway role when "
                           "HERALD_ADMIN_TOKEN is set. Every route needs "
                           "`Authorization: Bearer <token>`; replay and reject are "
                           "written to the audit log with the token's label.",
        },
        "security": [{"bearer": []}],
        "paths": _paths(),
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": copy.deepcopy(_SCHEMAS),
        },
    }
