"""``guard()``: wrap an LLM client so that every call is checked. Dispatch by type; the
integrations are imported only when used, so the base install needs neither openai nor
langchain."""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

from ._base_client import NOT_GIVEN, NotGiven, OnBlock, OnVerdict, Timeout
from ._client import AsyncGuardkit, Guardkit
from ._config import BlockedMessage, GuardConfig, GuardMode, StreamOptions
from ._selection import PolicySpec
from .types import OnError

T = TypeVar("T")

__all__ = ["guard"]


def guard(
    target: T,
    *,
    client: Guardkit | AsyncGuardkit | None = None,
    config: GuardConfig | None = None,
    policies: PolicySpec | NotGiven = NOT_GIVEN,
    monitor: Sequence[str] | NotGiven = NOT_GIVEN,
    on_error: OnError | Mapping[str, OnError] | None | NotGiven = NOT_GIVEN,
    input_policies: PolicySpec | NotGiven = NOT_GIVEN,
    output_policies: PolicySpec | NotGiven = NOT_GIVEN,
    check_input: bool | NotGiven = NOT_GIVEN,
    check_output: bool | NotGiven = NOT_GIVEN,
    mode: GuardMode | NotGiven = NOT_GIVEN,
    stream: StreamOptions | Mapping[str, Any] | NotGiven = NOT_GIVEN,
    suppress: bool | NotGiven = NOT_GIVEN,
    blocked_message: BlockedMessage | NotGiven = NOT_GIVEN,
    timeout: Timeout | NotGiven = NOT_GIVEN,
    on_block: OnBlock | None | NotGiven = NOT_GIVEN,
    on_verdict: OnVerdict | None | NotGiven = NOT_GIVEN,
) -> Any:
    """Guard an LLM client: the input turn is checked before (or alongside) each call, the
    output after it (in chunks when streaming).

    - ``openai.OpenAI`` / ``AsyncOpenAI``: returns a client whose ``chat.completions.create``
      (and ``parse``) are guarded; everything else passes through.
    - a LangChain chat model or any ``Runnable``: returns a ``Runnable`` with the same
      ``invoke`` / ``ainvoke`` / ``stream`` / ``astream`` (and ``batch``).

    ``client`` is the guardkit client (default: ``Guardkit()`` from the environment); the other
    arguments are ``GuardConfig`` fields (see there), applied over ``config``.
    """
    given = {
        name: value
        for name, value in dict(
            policies=policies, monitor=monitor, on_error=on_error, input_policies=input_policies,
            output_policies=output_policies, check_input=check_input, check_output=check_output,
            mode=mode, stream=stream, suppress=suppress, blocked_message=blocked_message,
            timeout=timeout, on_block=on_block, on_verdict=on_verdict,
        ).items()
        if not isinstance(value, NotGiven)
    }
    settings = (config or GuardConfig()).merged(given)
    if _is_instance(target, "openai", ("OpenAI", "AsyncOpenAI")):
        from guardkit.integrations.openai import guard_openai

        return guard_openai(target, client, settings)
    if _is_instance(target, "langchain_core.runnables", ("Runnable",)):
        from guardkit.integrations.langchain import GuardedRunnable

        return GuardedRunnable(target, client=client, config=settings)
    raise TypeError(
        f"guard() wraps an openai.OpenAI / AsyncOpenAI client or a LangChain Runnable, "
        f"not {type(target).__module__}.{type(target).__qualname__}"
    )


def _is_instance(obj: object, module: str, names: tuple[str, ...]) -> bool:
    """isinstance against classes of a package that may not be installed (or imported)."""
    loaded = sys.modules.get(module)
    if loaded is None:
        return False
    classes = tuple(getattr(loaded, n) for n in names if hasattr(loaded, n))
    return bool(classes) and isinstance(obj, classes)


def sync_client(client: Guardkit | AsyncGuardkit | None) -> Guardkit:
    if client is None:
        return Guardkit()
    return client if isinstance(client, Guardkit) else client.to_sync()


def async_client(client: Guardkit | AsyncGuardkit | None) -> AsyncGuardkit:
    if client is None:
        return AsyncGuardkit()
    return client if isinstance(client, AsyncGuardkit) else client.to_async()


class LazyClients:
    """Mixin for integrations that run sync and async: the client of the other flavor is made
    from the given one (sharing its settings) the first time it is needed."""

    def _set_client(self, client: Guardkit | AsyncGuardkit | None) -> None:
        self._client = client
        self._sync: Guardkit | None = client if isinstance(client, Guardkit) else None
        self._async: AsyncGuardkit | None = client if isinstance(client, AsyncGuardkit) else None

    @property
    def guardkit(self) -> Guardkit:
        if self._sync is None:
            self._sync = sync_client(self._client)
        return self._sync

    @property
    def aguardkit(self) -> AsyncGuardkit:
        if self._async is None:
            self._async = async_client(self._client)
        return self._async
