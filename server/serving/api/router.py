"""HTTP routes: guard calls, policy management, health and metrics."""

from __future__ import annotations

import hmac
from typing import TYPE_CHECKING, Annotated

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from guardkit.types import GuardRequest, GuardResult, PolicyInfo, PolicyList, PolicyLoadRequest
from guardkit_server.policies.registry import LoadedPolicy
from guardkit_server.serving.api.errors import RouteError
from guardkit_server.serving.fanout import Tenant

if TYPE_CHECKING:
    from guardkit_server.serving.api.app import ServerRuntime

router = APIRouter()


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
    if not _server(request).ready:
        raise RouteError(503, "the server is starting: model or policies not loaded yet")


def policy_info(p: LoadedPolicy) -> PolicyInfo:
    m = p.manifest
    return PolicyInfo(
        name=m.name, version=m.version, description=m.description, rule=m.rule, method=m.method,
        activated=m.activated, labels=m.labels, block_label=m.block_label, threshold=m.threshold,
        base_model=m.base_model.name, contract_version=m.contract_version,
    )


@router.post("/v1/guard", response_model=GuardResult, dependencies=[Depends(ready)])
async def post_guard(
    body: GuardRequest, request: Request, who: Annotated[Tenant, Depends(tenant)]
) -> GuardResult:
    """Judge a conversation against policies; one verdict per policy plus the turn's decision."""
    return await _server(request).fanout.run(body, who, request_id=request.state.request_id)


@router.get("/v1/policies", response_model=PolicyList, dependencies=[Depends(tenant)])
async def list_policies(request: Request) -> PolicyList:
    return PolicyList(policies=[policy_info(p) for p in _server(request).registry.snapshot().values()])


@router.post(
    "/v1/policies", response_model=PolicyInfo, status_code=201,
    dependencies=[Depends(admin), Depends(ready)],
)
async def load_policy(body: PolicyLoadRequest, request: Request) -> PolicyInfo:
    """Load (or, with replace, atomically swap in) a policy folder on the server's disk."""
    return policy_info(await _server(request).registry.load(body.path, replace=body.replace))


@router.delete("/v1/policies/{name}", response_model=PolicyInfo, dependencies=[Depends(admin)])
async def remove_policy(name: str, request: Request) -> PolicyInfo:
    try:
        return policy_info(await _server(request).registry.remove(name))
    except KeyError:
        raise RouteError(404, f"unknown policy {name!r}", "name") from None


@router.post("/v1/policies/rescan", dependencies=[Depends(admin), Depends(ready)])
async def rescan(request: Request) -> dict[str, list[str]]:
    """Re-read the policy directories: add new folders, replace changed ones, drop removed ones."""
    return await _server(request).registry.rescan()


@router.get("/health")
async def health() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/ready")
async def readiness(request: Request) -> JSONResponse:
    server = _server(request)
    body = {
        "status": "ready" if server.ready else "starting",
        "model": server.model_name,
        "policies": list(server.registry.snapshot()) if server.registry else [],
    }
    return JSONResponse(body, status_code=200 if server.ready else 503)


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    return Response(generate_latest(_server(request).metrics.registry), media_type=CONTENT_TYPE_LATEST)
