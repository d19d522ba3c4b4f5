"""HTTP routes: guard calls, policy management, health and metrics."""

from __future__ import annotations

import hmac
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import APIRouter, Depends, Header, Request, Response
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel

from guardkit.types import (
    ErrorResponse,
    GuardRequest,
    GuardResult,
    PolicyInfo,
    PolicyList,
    PolicyLoadRequest,
)
from guardkit_server.policies.manifest import PolicyManifest
from guardkit_server.policies.registry import LoadedPolicy
from guardkit_server.serving.admission import MIN_CALL_COST
from guardkit_server.serving.api.errors import RouteError
from guardkit_server.serving.fanout import Tenant

if TYPE_CHECKING:
    from guardkit_server.serving.runtime import ServerRuntime

# Headers that come with an error status (documented, so clients and the fuzz test see them).
_ERROR_HEADERS: dict[int, dict[str, Any]] = {
    401: {"WWW-Authenticate": {"description": "Always `Bearer`.", "schema": {"type": "string"}}},
    429: {
        "Retry-After": {
            "description": "Seconds to wait before retrying.", "schema": {"type": "integer"}
        }
    },
}


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries for the error statuses a route can answer (one envelope for all)."""
    entries: dict[int | str, dict[str, Any]] = {}
    for status in statuses:
        entries[status] = {"model": ErrorResponse}
        if status in _ERROR_HEADERS:
            entries[status]["headers"] = _ERROR_HEADERS[status]
    return entries


def _server(request: Request) -> ServerRuntime:
    return request.app.state.runtime  # type: ignore[no-any-return]


def _api_key(request: Request) -> str | None:
    auth = request.headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        return auth[7:].strip()
    return request.headers.get("x-api-key")


def tenant(request: Request) -> Tenant:
    """The caller's tenant; 401 when keys are configured and none (or a wrong one) is sent."""
    keys: dict[str, str] = _server(request).config.api_keys
    if not keys:
        return Tenant("default")
    key = _api_key(request)
    if not key:
        raise RouteError(401, "missing API key: send 'Authorization: Bearer <key>'")
    for known, tenant_id in keys.items():
        if hmac.compare_digest(known.encode(), key.encode()):
            return Tenant(tenant_id)
    raise RouteError(401, "invalid API key")


def _known_key(request: Request) -> bool | None:
    """None: the server has no keys; else whether the request carries a tenant or admin key."""
    config = _server(request).config
    if not config.api_keys and not config.admin_key:
        return None
    key = (_api_key(request) or "").encode()
    known = [*config.api_keys, *([config.admin_key] if config.admin_key else [])]
    return bool(key) and any(hmac.compare_digest(k.encode(), key) for k in known)


def reader(request: Request) -> None:
    """Reading server state (policies, metrics, API docs): any tenant key or the admin key."""
    if _known_key(request) is False:
        raise RouteError(401, "missing or invalid API key: send 'Authorization: Bearer <key>'")


def admin(request: Request) -> None:
    """Policy management: open without auth, else only with the admin key."""
    config = _server(request).config
    if not config.api_keys and not config.admin_key:
        return
    if not config.admin_key:
        raise RouteError(403, "policy management is disabled: start the server with --admin-key")
    key = _api_key(request) or ""
    if not hmac.compare_digest(config.admin_key.encode(), key.encode()):
        raise RouteError(401 if not key else 403, "policy management needs the admin key")


def ready(request: Request) -> None:
    server = _server(request)
    server.check_engine()
    if server.engine_failed:
        raise RouteError(503, "the engine has failed; the server is exiting for a restart")
    if not server.ready:
        raise RouteError(503, "the server is starting: model or policies not loaded yet")


async def _utf8_body(request: Request) -> None:
    body = await request.body()
    try:
        body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RouteError(
            400, f"the request body is not valid UTF-8 (byte {exc.start}); send JSON in UTF-8",
            kind="invalid_utf8",
        ) from None


def admission_open(request: Request) -> None:
    """A saturated server refuses a guard call before reading its body (429 at once)."""
    server = _server(request)
    if server.fanout is not None:  # even the smallest call would be refused
        server.fanout.admission.refuse_early(1, MIN_CALL_COST, server.config.default_timeout_ms / 1000)


_ACCESS: tuple[Callable[[Request], object], ...] = (ready, tenant, admin, reader)
# Checked after access, before the body is read: cheap refusals that need no body.
_BEFORE_BODY: dict[str, Callable[[Request], None]] = {"/v1/guard": admission_open}


class _AccessFirst(APIRoute):
    """The route's key and readiness checks, in their declared order, before its body is read.

    FastAPI parses a JSON body before it runs any dependency, so a malformed body got 400 even
    from a caller without a key, and a tenant's refused admin call answered 400 instead of 403.
    Then the body must be UTF-8 (400, with the byte), then FastAPI parses and validates it.
    The checks run again as dependencies; they are cheap and have no side effects.
    """

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        checks = [d.call for d in self.dependant.dependencies if d.call in _ACCESS]
        if self.path in _BEFORE_BODY:
            checks.append(_BEFORE_BODY[self.path])
        has_body = self.body_field is not None

        async def checked_first(request: Request) -> Response:
            for check in checks:
                check(request)
            if has_body:
                await _utf8_body(request)
            return await handler(request)

        return checked_first


router = APIRouter(route_class=_AccessFirst)


class ReadyState(BaseModel):
    status: str
    model: str | None = None
    policies: list[str] | None = None


def policy_info(p: LoadedPolicy) -> PolicyInfo:
    m = p.manifest
    return PolicyInfo(
        name=m.name, version=m.version, description=m.description, rule=m.rule, method=m.method,
        adapter=p.checked.judge.manifest.name if p.checked.judge is not None else None,
        enforce=m.enforce, activated=m.activated, labels=m.labels, block_label=m.block_label, threshold=m.threshold,
        base_model=m.base_model.name if m.base_model else "", contract_version=m.contract_version,
        test_accuracy=(m.training.get("test") or {}).get("accuracy"),
        validation_accuracy=(m.training.get("validation") or {}).get("accuracy"),
    )


@router.post(
    "/v1/guard", response_model=GuardResult, dependencies=[Depends(ready)],
    responses=_errors(400, 401, 404, 413, 422, 429, 503),
)
async def post_guard(
    body: GuardRequest, request: Request, who: Annotated[Tenant, Depends(tenant)],
    x_guardkit_conversation: Annotated[
        str | None,
        Header(
            max_length=256,
            description="The conversation id when the body has none (what a load balancer "
            "in front of replicas hashes; docs/scale-out.md).",
        ),
    ] = None,
) -> GuardResult:
    """Judge a conversation against policies; one verdict per policy plus the turn's decision."""
    if body.conversation_id is None and x_guardkit_conversation:
        body = body.model_copy(update={"conversation_id": x_guardkit_conversation})
    return await _server(request).fanout.run(body, who, request_id=request.state.request_id)


@router.get(
    "/v1/policies", response_model=PolicyList, dependencies=[Depends(reader), Depends(ready)],
    responses=_errors(401, 503),
)
async def list_policies(request: Request) -> PolicyList:
    registry = _server(request).registry
    if registry is None:
        raise RouteError(503, "the server is starting: policies not loaded yet")
    return PolicyList(policies=[policy_info(p) for p in registry.snapshot().values()])


@router.post(
    "/v1/policies", response_model=PolicyInfo, status_code=201,
    responses=_errors(400, 401, 403, 409, 413, 422, 503),
    dependencies=[Depends(admin), Depends(ready)],
)
async def load_policy(body: PolicyLoadRequest, request: Request) -> PolicyInfo:
    """Load (or, with replace, atomically swap in) a policy folder on the server's disk, or a rule
    policy served by one of the server's judge adapters."""
    registry = _server(request).registry
    if body.rule is None:
        assert body.path is not None
        return policy_info(await registry.load(body.path, replace=body.replace))
    spec = body.rule
    manifest = PolicyManifest(method="judge", **spec.model_dump(exclude_none=True))
    checked = registry.checker.check_rule(manifest, f"rule {spec.name!r}")
    return policy_info(await registry.load_rule(checked, replace=body.replace))


@router.delete(
    "/v1/policies/{name}", response_model=PolicyInfo,
    dependencies=[Depends(admin), Depends(ready)],
    # 422 only replaces FastAPI's default entry (another body shape); a str name cannot fail
    responses=_errors(401, 403, 404, 422, 503),
)
async def remove_policy(name: str, request: Request) -> PolicyInfo:
    try:
        return policy_info(await _server(request).registry.remove(name))
    except KeyError:
        raise RouteError(404, f"unknown policy {name!r}", "name") from None


@router.post(
    "/v1/policies/rescan", dependencies=[Depends(admin), Depends(ready)],
    responses=_errors(401, 403, 413, 503),
)
async def rescan(request: Request) -> dict[str, list[str]]:
    """Re-read the policy directories: add new folders, replace changed ones, drop removed ones."""
    return await _server(request).registry.rescan()


@router.get("/health")
async def health() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/ready", responses={200: {"model": ReadyState}, 503: {"model": ReadyState}})
async def readiness(request: Request) -> JSONResponse:
    """200 when calls can be served, else 503; model and policies only for a known key."""
    server = _server(request)
    server.check_engine()
    body: dict[str, object] = {"status": server.state}
    if _known_key(request) is not False:
        body["model"] = server.model_name
        body["policies"] = list(server.registry.snapshot()) if server.registry else []
    return JSONResponse(body, status_code=200 if server.ready else 503)


@router.get(
    "/metrics", dependencies=[Depends(reader)], response_class=Response,
    responses={
        200: {
            "description": "The Prometheus text exposition format.",
            "content": {"text/plain": {"schema": {"type": "string"}}},
        },
        **_errors(401),
    },
)
async def metrics(request: Request) -> Response:
    return Response(generate_latest(_server(request).metrics.registry), media_type=CONTENT_TYPE_LATEST)
