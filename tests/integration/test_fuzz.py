"""Property-based fuzzing of the real guardkit-server against its own OpenAPI document.

schemathesis generates requests from ``/openapi.json`` for every documented operation, valid
ones and (where there is a body) ones that break the schema. Every answer must be a
documented, non-5xx status with the documented content type, headers and body (the error
envelope for errors).

Policy management (load, remove, rescan) changes state: it is fuzzed with a tenant key and
must be refused (403) and change nothing, so the session's shared server keeps its policies for
the other tests. The admin key is never sent. Every protected operation is also fuzzed without
a key: 401, whatever the body.

Deterministic (derandomized Hypothesis, no example database) so a CI failure reproduces.

The operations are driven through schemathesis' public ``APIOperation.as_strategy`` and
Hypothesis' ``@given``, not ``schemathesis.pytest.from_fixture``: its lazy loader reads
``Node._nodeid``, which pytest 9.2 no longer has.
"""

from __future__ import annotations

import re

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

pytestmark = [pytest.mark.server]

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]
# Every operation in the OpenAPI document, by who may call it (test_every_operation_is_fuzzed
# keeps this complete): "open" needs no key, "reader" any key, "tenant" a tenant key, "admin"
# the admin key (state-changing: never sent here).
OPERATIONS = {
    ("POST", "/v1/guard"): "tenant",
    ("GET", "/v1/policies"): "reader",
    ("POST", "/v1/policies"): "admin",
    ("DELETE", "/v1/policies/{name}"): "admin",
    ("POST", "/v1/policies/rescan"): "admin",
    ("GET", "/health"): "open",
    ("GET", "/ready"): "open",
    ("GET", "/metrics"): "reader",
}
# Operations with a request body: only there can schema-breaking (negative) data be generated
# (a string path parameter has no invalid value).
WITH_BODY = {("POST", "/v1/guard"), ("POST", "/v1/policies")}
EXAMPLES = {"tenant": 40, "anonymous": 15}  # per operation and mode: the fuzz takes ~25 s on 2 cores


def _fuzz_cases() -> list:
    cases = []
    for (method, path), access in OPERATIONS.items():
        modes = ["positive", "negative"] if (method, path) in WITH_BODY else ["positive"]
        callers = ["tenant"] if access == "open" else ["tenant", "anonymous"]
        for caller in callers:
            for mode in modes:
                cases.append(pytest.param(method, path, mode, caller, id=f"{method} {path}-{mode}-{caller}"))
    return cases


def _policy_names(server) -> list[str]:
    answer = httpx.get(f"{server.url}/v1/policies", headers=server.headers(), timeout=30)
    assert answer.status_code == 200, answer.text
    return sorted(p["name"] for p in answer.json()["policies"])


@pytest.fixture(scope="module")
def session_policies(guard_server) -> list[str]:
    return _policy_names(guard_server)


@pytest.fixture(scope="module")
def api_schema(guard_server, session_policies):
    """The server's own OpenAPI document, fetched with the tenant key (it is behind auth)."""
    schema = schemathesis.openapi.from_url(
        f"{guard_server.url}/openapi.json",
        headers=guard_server.headers(),
        timeout=30,
        config=schemathesis.Config(),  # no schemathesis.toml discovery: the same run everywhere
    )
    yield schema
    # Nothing the fuzz sent may have changed the policies the other tests rely on.
    assert _policy_names(guard_server) == session_policies


def test_every_operation_is_fuzzed(api_schema):
    documented, with_body = set(), set()
    for result in api_schema.get_all_operations():
        operation = result.ok()  # raises on an operation schemathesis cannot read
        key = (operation.method.upper(), operation.path)
        documented.add(key)
        if operation.body:
            with_body.add(key)
    assert documented == set(OPERATIONS)
    assert with_body == WITH_BODY


@pytest.mark.parametrize("method, path, mode, caller", _fuzz_cases())
def test_fuzz(api_schema, guard_server, session_policies, method, path, mode, caller):
    operation = api_schema[path][method]
    access = OPERATIONS[(method, path)]
    headers = guard_server.headers() if caller == "tenant" else {}  # never the admin key
    expected = {"tenant": 403 if access == "admin" else None, "anonymous": 401}[caller]

    @settings(
        max_examples=EXAMPLES[caller],
        deadline=None,
        derandomize=True,
        database=None,
        print_blob=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large],
    )
    @given(case=operation.as_strategy(generation_mode=GenerationMode(mode)))
    def fuzz(case) -> None:
        if path == "/v1/policies/{name}":
            # Never even name a shared policy: a wrong answer must not cost the other tests it.
            name = str(case.path_parameters.get("name", ""))
            if name in session_policies:
                case.path_parameters = {**case.path_parameters, "name": f"fuzz-{name}"}
        response = case.call_and_validate(
            base_url=guard_server.url, headers=headers, checks=CHECKS, timeout=120
        )
        if expected is not None:
            assert response.status_code == expected, (
                f"{method} {case.formatted_path} ({caller}) answered "
                f"{response.status_code}, not {expected}: {response.text[:500]}"
            )

    fuzz()


def _template_regex(template: str) -> re.Pattern[str]:
    return re.compile("^" + re.sub(r"\\\{[^}]+\\\}", "[^/]+", re.escape(template)) + "$")


@pytest.mark.parametrize("concrete", ["/v1/guard", "/v1/policies", "/v1/policies/rescan", "/v1/policies/fuzz-x", "/health", "/ready", "/metrics"])
def test_unserved_methods_get_405_and_allow_names_every_served_method(api_schema, guard_server, concrete):
    served = {
        method for method, template in OPERATIONS if _template_regex(template).match(concrete)
    }  # /v1/policies/rescan: POST (rescan) and DELETE (a policy named "rescan")
    assert served
    for method in ("PUT", "PATCH"):
        answer = httpx.request(method, f"{guard_server.url}{concrete}", headers=guard_server.headers(), timeout=30)
        assert answer.status_code == 405, answer.text
        assert answer.json()["error"]["type"] == "method_not_allowed"
        allowed = {m.strip() for m in answer.headers["allow"].split(",")} - {"HEAD"}
        assert allowed == served, (concrete, answer.headers["allow"])
