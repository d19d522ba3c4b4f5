"""``GuardkitMiddleware``: guardkit in a LangChain v1 agent (``create_agent(middleware=[...])``).

``before_model`` judges the conversation before every model call (the user's turn, and tool
results on later steps); ``after_model`` judges the model's answer before tools run or it is
returned. On a block, ``exit_behavior="end"`` ends the run with a refusal message (a blocked
answer is replaced, so its tool calls never run); ``"raise"`` raises ``InputBlocked`` /
``OutputBlocked``.

The hooks see whole messages: when the agent streams tokens (``stream_mode="messages"``) the
model's tokens are emitted while it generates, before ``after_model``. To hold streamed tokens
back until they pass, give the agent a guarded model as well (see docs/sdk.md).
"""

from __future__ import annotations

from typing import Any, Literal

from langchain.agents.middleware import AgentMiddleware, AgentState, hook_config
from langchain_core.messages import AIMessage
from langgraph.runtime import Runtime

from guardkit._client import AsyncGuardkit, Guardkit
from guardkit._config import GuardConfig
from guardkit._exceptions import blocked_error
from guardkit._guard import LazyClients
from guardkit._report import GuardReport
from guardkit.types import GuardResult, Stage

from ._langchain_messages import input_messages

__all__ = ["GuardkitMiddleware"]

ExitBehavior = Literal["end", "raise"]


class GuardkitMiddleware(LazyClients, AgentMiddleware):
    """Check every model turn of an agent; block by ending the run or raising.

    ``client``: a ``Guardkit`` or ``AsyncGuardkit`` (its twin is derived for the other kind of
    run); other keyword arguments are ``GuardConfig`` fields (policies, monitor, on_error,
    input_policies, output_policies, blocked_message, timeout, on_block, on_verdict ...).
    """

    def __init__(
        self,
        *,
        client: Guardkit | AsyncGuardkit | None = None,
        config: GuardConfig | None = None,
        exit_behavior: ExitBehavior = "end",
        **options: Any,
    ) -> None:
        super().__init__()
        if exit_behavior not in ("end", "raise"):
            raise ValueError(f"exit_behavior must be 'end' or 'raise', not {exit_behavior!r}")
        self.guard_config = (config or GuardConfig()).merged(options)
        self.exit_behavior = exit_behavior
        self._set_client(client)

    # -------------------------------------------------------------- hooks
    @hook_config(can_jump_to=["end"])
    def before_model(self, state: AgentState, runtime: Runtime[Any]) -> dict[str, Any] | None:
        if not self.guard_config.check_input:
            return None
        result = self.guardkit.check(input_messages(state), **self.guard_config.check_kwargs("input"))
        return self._outcome(result, "input", state)

    @hook_config(can_jump_to=["end"])
    async def abefore_model(self, state: AgentState, runtime: Runtime[Any]) -> dict[str, Any] | None:
        if not self.guard_config.check_input:
            return None
        result = await self.aguardkit.check(input_messages(state), **self.guard_config.check_kwargs("input"))
        return self._outcome(result, "input", state)

    @hook_config(can_jump_to=["end"])
    def after_model(self, state: AgentState, runtime: Runtime[Any]) -> dict[str, Any] | None:
        if not self.guard_config.check_output:
            return None
        result = self.guardkit.check(_with_answer(state), **self.guard_config.check_kwargs("output"))
        return self._outcome(result, "output", state)

    @hook_config(can_jump_to=["end"])
    async def aafter_model(self, state: AgentState, runtime: Runtime[Any]) -> dict[str, Any] | None:
        if not self.guard_config.check_output:
            return None
        result = await self.aguardkit.check(_with_answer(state), **self.guard_config.check_kwargs("output"))
        return self._outcome(result, "output", state)

    # ------------------------------------------------------------ outcome
    def _outcome(self, result: GuardResult, stage: Stage, state: AgentState) -> dict[str, Any] | None:
        if not result.blocked:
            return None
        report = GuardReport(input=result) if stage == "input" else GuardReport(output=[result])
        if self.exit_behavior == "raise":
            raise blocked_error(result, stage, report)
        refusal = AIMessage(
            content=self.guard_config.refusal(result),
            response_metadata={"finish_reason": "content_filter", "guardkit": report.model_dump(mode="json")},
        )
        if stage == "output":
            refusal.id = state["messages"][-1].id  # same id: replaces the blocked answer
        return {"messages": [refusal], "jump_to": "end"}


def _with_answer(state: AgentState) -> list[Any]:
    messages = input_messages(state)
    if messages and messages[-1].role != "assistant":
        raise ValueError("after_model ran without a model answer as the last message")
    return messages
