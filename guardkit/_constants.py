"""Defaults shared by the clients and the integrations."""

from __future__ import annotations

DEFAULT_BASE_URL = "http://127.0.0.1:8600"
BASE_URL_ENV = "GUARDKIT_BASE_URL"
API_KEY_ENV = "GUARDKIT_API_KEY"

# The whole guard call, retries included (seconds). The server gets what is left of it as
# ``timeout_ms`` so it can answer with error verdicts before the client gives up.
DEFAULT_TIMEOUT = 30.0
DEFAULT_MAX_RETRIES = 2
# Guards sit on the hot path of every chat turn: retry quickly, never wait long.
INITIAL_RETRY_DELAY = 0.1
MAX_RETRY_DELAY = 2.0
# Share of the remaining deadline the server may spend, the rest covers transport.
SERVER_DEADLINE_SHARE = 0.9

RETRYABLE_STATUS = frozenset({429, 500, 502, 503, 504})

LOGGER_NAME = "guardkit"
# Every guardkit-server answer carries its request id; a guard call's is its result's ``id``.
REQUEST_ID_HEADER = "x-request-id"
