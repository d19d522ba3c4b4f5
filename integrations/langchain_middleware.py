"""``GuardkitMiddleware``: guardkit in a LangChain v1 agent (``create_agent(middleware=[...])``).

It wraps every model call (``wrap_model_call`` / ``awrap_model_call``), so it judges what the
model is actually sent: the system prompt (``create_agent(system_prompt=...)``, or what
middleware before it made of it), the conversation, tool results (``ToolMessage``) included.

- Input: that conversation is judged before the call; a block ends the turn without calling
  the model.
- Output: the call runs with the request's model guarded (``GuardedChatModel``, input check
  off): its answer is judged before it enters the agent's state, so its tool calls never run
  when it is blocked, and when the agent streams tokens (``stream_mode="messages"``,
  ``astream_events``) they are held back until they pass, as ``guard(model)`` holds them.
- A block: ``exit_behavior="end"`` answers with a refusal ``AIMessage`` (no tool calls, so the
  agent stops; ``response_metadata["finish_reason"] == "content_filter"``, the report under
  ``"guardkit"``); ``"error"`` raises ``InputBlocked`` / ``OutputBlocked``. (``"raise"`` is a
  deprecated alias of ``"error"``.)

Middleware listed before this one wraps it (and sees the request first); list it last to judge
exactly what reaches the model. If middleware inside it changes the model, the answer it gets
back is still judged whole before it is returned.
"""

from __future__ import annotations

import warnings
from collections.abc import Awaitable, Callable
from typing import Any, Literal

from langchain.agents.middleware import AgentMiddleware, AgentState, ModelRequest, ModelResponse
from langchain_core.messages import AIMessage, BaseMessage

from guardkit._client import AsyncGuardkit, Guardkit
from guardkit._config import GuardConfig
from guardkit._exceptions import GuardBlocked, blocked_error
from guardkit._guard import LazyClients
from guardkit._report import GuardReport
from guardkit.types import GuardResult, Stage

from ._langchain_guarded import GuardedChatModel, chat_model_of
from ._langchain_messages import input_messages

__all__ = ["GuardkitMiddleware", "ExitBehavior"]

ExitBehavior = Literal["end", "error"]

Handler = Callable[[ModelRequest[Any]], ModelResponse[Any]]
AsyncHandler = Callable[[ModelRequest[Any]], Awaitable[ModelResponse[Any]]]


class GuardkitMiddleware(LazyClients, AgentMiddleware[AgentState[Any], Any, Any]):
    """Check every model call of an agent; block by ending the turn or raising.

    ``client``: a ``Guardkit`` or ``AsyncGuardkit`` (its twin is derived for the other kind of
    run); other keyword arguments are ``GuardConfig`` fields (policies, monitor, on_error,
    input_policies, output_policies, stream, blocked_message, timeout, on_block, on_verdict ...).
    ``suppress`` and ``mode`` do not apply: ``exit_behavior`` says what a block does, and the
    input is always judged before the model is called.
    """

    guard_config: GuardConfig
    exit_behavior: ExitBehavior

    def __init__(
        self,
        *,
        client: Guardkit | AsyncGuardkit | None = None,
        config: GuardConfig | None = None,
        exit_behavior: ExitBehavior | Literal["raise"] = "end",
        **options: Any,
    ) -> None:
        super().__init__()
        if exit_behavior == "raise":
            warnings.warn(
                "GuardkitMiddleware(exit_behavior='raise') is deprecated: use 'error' (LangChain's "
                "name for it)", DeprecationWarning, stacklevel=2,
            )
            exit_behavior = "error"
        if exit_behavior not in ("end", "error"):
            raise ValueError(f"exit_behavior must be 'end' or 'error', not {exit_behavior!r}")
        self.guard_config = (config or GuardConfig()).merged(options)
        self.exit_behavior = exit_behavior
        self._set_client(client)

    # -------------------------------------------------------------- hooks
    def wrap_model_call(self, request: ModelRequest[Any], handler: Handler) -> ModelResponse[Any]:
        cfg = self.guard_config
        conversation = _conversation(request)
        if cfg.check_input:
            result = self.guardkit.check(input_messages(conversation), **cfg.check_kwargs("input"))
            if result.blocked:
                return self._refuse(result, "input", GuardReport(input=result))
        if not cfg.check_output:
            return handler(request)
        reports: list[GuardReport] = []
        guarded = self._guarded(request, reports)
        try:
            response = handler(guarded)
        except GuardBlocked:
            raise
        except Exception:
            blocked = _blocked_output(reports)
            if blocked is None:
                raise
            return self._refuse(blocked.output[-1], "output", blocked)  # e.g. a refusal that no parser reads
        if guarded is request or not reports:  # the answer did not come from the guarded model
            answer = _answer(response)
            if answer is not None:
                result = self.guardkit.check(
                    input_messages([*conversation, answer]), **cfg.check_kwargs("output")
                )
                if result.blocked:
                    return self._refuse(result, "output", GuardReport(output=[result]))
            return response
        return self._outcome(response, reports)

    async def awrap_model_call(self, request: ModelRequest[Any], handler: AsyncHandler) -> ModelResponse[Any]:
        cfg = self.guard_config
        conversation = _conversation(request)
        if cfg.check_input:
            result = await self.aguardkit.check(input_messages(conversation), **cfg.check_kwargs("input"))
            if result.blocked:
                return self._refuse(result, "input", GuardReport(input=result))
        if not cfg.check_output:
            return await handler(request)
        reports: list[GuardReport] = []
        guarded = self._guarded(request, reports)
        try:
            response = await handler(guarded)
        except GuardBlocked:
            raise
        except Exception:
            blocked = _blocked_output(reports)
            if blocked is None:
                raise
            return self._refuse(blocked.output[-1], "output", blocked)
        if guarded is request or not reports:
            answer = _answer(response)
            if answer is not None:
                result = await self.aguardkit.check(
                    input_messages([*conversation, answer]), **cfg.check_kwargs("output")
                )
                if result.blocked:
                    return self._refuse(result, "output", GuardReport(output=[result]))
            return response
        return self._outcome(response, reports)

    # ------------------------------------------------------------ helpers
    def _guarded(self, request: ModelRequest[Any], reports: list[GuardReport]) -> ModelRequest[Any]:
        """The request with its model guarded for the output (the input is judged here).

        With ``exit_behavior="end"`` the guarded model answers a block with its refusal
        (``suppress``) rather than an error that middleware inside this one might retry.
        """
        if chat_model_of(request.model) is None:
            return request
        config = self.guard_config.merged(
            {"check_input": False, "suppress": self.exit_behavior == "end", "mode": "blocking"}
        )
        model = GuardedChatModel(request.model, client=self._client, config=config)
        model._sync, model._async = self._sync, self._async
        return request.override(model=model.record_reports(reports))

    def _outcome(self, response: ModelResponse[Any], reports: list[GuardReport]) -> ModelResponse[Any]:
        """The answer of the guarded model: as it is, or (blocked, suppressed) its refusal."""
        blocked = _blocked_output(reports)
        if blocked is None:
            return response
        answer = _answer(response)
        if answer is not None and answer.response_metadata.get("finish_reason") == "content_filter":
            return ModelResponse(result=[answer])  # the refusal streamed as the answer: keep its id
        return self._refuse(blocked.output[-1], "output", blocked)

    def _refuse(self, result: GuardResult, stage: Stage, report: GuardReport) -> ModelResponse[Any]:
        if self.exit_behavior == "error":
            raise blocked_error(result, stage, report)
        refusal = AIMessage(
            content=self.guard_config.refusal(result),
            response_metadata={"finish_reason": "content_filter", "guardkit": report.model_dump(mode="json")},
        )
        return ModelResponse(result=[refusal])


def _conversation(request: ModelRequest[Any]) -> list[BaseMessage]:
    """What the model is sent: the system message, then the messages (tool results included)."""
    system = [request.system_message] if request.system_message is not None else []
    return [*system, *request.messages]


def _answer(response: ModelResponse[Any]) -> AIMessage | None:
    answers = [m for m in response.result if isinstance(m, AIMessage)]
    return answers[-1] if answers else None


def _blocked_output(reports: list[GuardReport]) -> GuardReport | None:
    return next((r for r in reversed(reports) if r.output and r.output[-1].blocked), None)

