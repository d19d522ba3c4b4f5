"""``guard()``: wrap an LLM client so that every call is checked. Dispatch by type; the
integrations are imported only when used, so the base install needs neither openai nor
langchain.

The guarded objects are proxies (``guardkit.integrations.openai.GuardedOpenAI``,
``guardkit.integrations.langchain.GuardedRunnable``), not instances of the wrapped classes. To
a type checker ``guard()`` returns the wrapped type, so a guarded client is checked exactly like
the original (``guard(OpenAI()).chat.completions.creat(...)`` is an error): for OpenAI a
subclass that adds ``guardkit``, ``guard_config``, ``unguarded`` and ``with_guard_options``; for
LangChain the model's (or Runnable's) own type.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar, overload

from ._base_client import NOT_GIVEN, NotGiven, OnBlock, OnVerdict, Timeout, check_hooks
from ._client import AsyncGuardkit, Guardkit
from ._config import BlockedMessage, GuardConfig, GuardMode, StreamOptions
from ._selection import PolicySpec
from .types import OnError

if TYPE_CHECKING:
    from typing import TypedDict

    from langchain_core.runnables import Runnable
    from openai import AsyncOpenAI, OpenAI
    from typing_extensions import Unpack

    class GuardOptions(TypedDict, total=False):
        """The ``GuardConfig`` fields, as keyword arguments of ``guard()``."""

        policies: PolicySpec
        monitor: Sequence[str]
        on_error: OnError | Mapping[str, OnError] | None
        input_policies: PolicySpec
        output_policies: PolicySpec
        check_input: bool
        check_output: bool
        mode: GuardMode
        stream: StreamOptions | Mapping[str, Any]
        suppress: bool
        blocked_message: BlockedMessage
        timeout: Timeout
        on_block: OnBlock | None
        on_verdict: OnVerdict | None
        conversation_id: str | None

    class GuardedOpenAI(OpenAI):
        """What ``guard(OpenAI())`` is to a type checker (at run time:
        ``guardkit.integrations.openai.GuardedOpenAI``)."""

        guardkit: Guardkit
        guard_config: GuardConfig

        @property
        def unguarded(self) -> OpenAI:
            """The wrapped client: calls through it are not checked."""
            raise NotImplementedError

        def with_guard_options(self, **changes: Unpack[GuardOptions]) -> GuardedOpenAI:
            raise NotImplementedError

    class AsyncGuardedOpenAI(AsyncOpenAI):
        """What ``guard(AsyncOpenAI())`` is to a type checker."""

        guardkit: AsyncGuardkit
        guard_config: GuardConfig

        @property
        def unguarded(self) -> AsyncOpenAI:
            raise NotImplementedError

        def with_guard_options(self, **changes: Unpack[GuardOptions]) -> AsyncGuardedOpenAI:
            raise NotImplementedError

    RunnableT = TypeVar("RunnableT", bound=Runnable[Any, Any])

__all__ = ["guard"]


@overload
def guard(
    target: OpenAI,
    *,
    client: Guardkit | AsyncGuardkit | None = None,
    config: GuardConfig | None = None,
    **options: Unpack[GuardOptions],
) -> GuardedOpenAI: ...
@overload
def guard(
    target: AsyncOpenAI,
    *,
    client: Guardkit | AsyncGuardkit | None = None,
    config: GuardConfig | None = None,
    **options: Unpack[GuardOptions],
) -> AsyncGuardedOpenAI: ...
@overload
def guard(
    target: RunnableT,
    *,
    client: Guardkit | AsyncGuardkit | None = None,
    config: GuardConfig | None = None,
    **options: Unpack[GuardOptions],
) -> RunnableT: ...
def guard(
    target: object,
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
    conversation_id: str | None | NotGiven = NOT_GIVEN,
) -> object:
    """Guard an LLM client: the input turn is checked before (or alongside) each call, the
    output after it (in chunks when streaming).

    - ``openai.OpenAI`` / ``AsyncOpenAI``: returns a client whose ``chat.completions.create``
      (and ``parse``) are guarded; everything else passes through.
    - a LangChain chat model or any ``Runnable``: returns a ``Runnable`` with the same
      ``invoke`` / ``ainvoke`` / ``stream`` / ``astream`` (and ``batch``).

    ``client`` is the guardkit client (default: ``Guardkit()`` from the environment); the other
    arguments are ``GuardConfig`` fields (see there), applied over ``config``. An empty
    ``input_policies`` / ``output_policies`` list checks no policy at that stage.
    ``conversation_id`` keeps every check of the conversation on the guardkit engine that has
    it cached (docs/scale-out.md); without it LangChain's ``configurable.thread_id`` and the
    Responses API's ``conversation`` are used where given.
    Blocks raise ``InputBlocked`` / ``OutputBlocked``; blocks only for want of a verdict
    (on_error="block") raise their subclasses ``InputUnavailable`` / ``OutputUnavailable``.
    """
    given = {
        name: value
        for name, value in dict(
            policies=policies, monitor=monitor, on_error=on_error, input_policies=input_policies,
            output_policies=output_policies, check_input=check_input, check_output=check_output,
            mode=mode, stream=stream, suppress=suppress, blocked_message=blocked_message,
            timeout=timeout, on_block=on_block, on_verdict=on_verdict,
            conversation_id=conversation_id,
        ).items()
        if not isinstance(value, NotGiven)
    }
    settings = (config or GuardConfig()).merged(given)
    if _is_instance(target, "openai", ("OpenAI", "AsyncOpenAI")):
        from guardkit.integrations.openai import guard_openai

        if _is_instance(target, "openai", ("OpenAI",)):  # only ever called synchronously
            check_hooks(
                "guard(OpenAI())", sync=True, on_block=settings.on_block, on_verdict=settings.on_verdict
            )
        return guard_openai(target, client, settings)  # type: ignore[arg-type]
    if _is_instance(target, "langchain_core.runnables", ("Runnable",)):
        from guardkit.integrations.langchain import GuardedRunnable

        return GuardedRunnable(target, client=client, config=settings)  # type: ignore[arg-type]
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
