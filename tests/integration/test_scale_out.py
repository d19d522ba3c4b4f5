"""Scale-out on real engines (tiny Qwen3, loopback): conversation affinity over two engines.

* one guardkit-server with ``--data-parallel-size 2``: a conversation's turns all land on one
  rank, two conversations spread over both (the server places by ``conversation_id``, body or
  ``X-Guardkit-Conversation`` header, else by its leading messages);
* two replicas behind nginx running ``docs/deploy/nginx/guardkit.conf``: the same, and a replica
  whose engine dies stops getting traffic; its conversation moves to the other replica (one full
  prefill there, then cached again).

Which engine served a call is read from the cached-token counts (a turn served where the
previous turn ran reads that turn's prefix from cache) and from the servers' own counters.
Unit tests of the placement logic: tests/unit/test_placement.py.
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil
import pytest

from guardkit import Guardkit
from guardkit.types import GuardResult
from guardkit_server.serving.placement import placement_key, rendezvous_order
from tests.support import builders
from tests.support.processes import free_port, spawn, start_server_process, stop, wait_ready

pytestmark = [pytest.mark.engine, pytest.mark.server]

BLOCK = 32  # the CPU engine's KV block size: prefix caching works in whole blocks
POLICIES = ["p0", "p1", "p2"]
REPO = Path(__file__).resolve().parents[2]
NGINX_SNIPPET = REPO / "docs" / "deploy" / "nginx" / "guardkit.conf"


@pytest.fixture(scope="module")
def scale_args(tiny, tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    policies = tmp_path_factory.mktemp("scale-policies")
    for i, name in enumerate(POLICIES):
        builders.build_policy(tiny.qwen3, policies / name, name, seed=300 + i)
    return [
        "--model", str(tiny.qwen3), "--policies", str(policies), "--dtype", "float32",
        "--max-model-len", "4096", "--max-lora-rank", "8", "--kv-cache-memory-gb", "0.1",
    ]


@dataclass
class Conversation:
    """A conversation that grows a turn at a time; its first message is long and unique, so
    only an engine that served it before has any of it cached."""

    id: str
    messages: list[dict[str, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        nonce = uuid.uuid4().hex[:8]
        opening = " ".join(f"Tell me about bread {nonce} number {i} and the oven." for i in range(20))
        self.messages = [{"role": "user", "content": opening}]

    def next_turn(self, n: int) -> list[dict[str, str]]:
        if n:
            self.messages += [
                {"role": "assistant", "content": f"Mix flour, water, yeast and salt ({n})."},
                {"role": "user", "content": f"What is the capital of France? Ask {n}."},
            ]
        return list(self.messages)


def home_rank(conversation_id: str, ranks: int = 2) -> int:
    return rendezvous_order(placement_key("default", conversation_id, []), range(ranks))[0]


def ids_on_both_ranks(prefix: str) -> tuple[str, str]:
    """Two conversation ids whose home ranks differ."""
    by_rank: dict[int, str] = {}
    for i in range(100):
        by_rank.setdefault(home_rank(f"{prefix}-{i}"), f"{prefix}-{i}")
    return by_rank[0], by_rank[1]


def assert_cached_from_previous_turn(result: GuardResult, previous: GuardResult) -> None:
    """Every policy read at least the previous turn's conversation (whole blocks) from cache."""
    floor = previous.usage.conversation_tokens - BLOCK
    assert all(v.cached_tokens >= floor for v in result.verdicts), (
        [v.cached_tokens for v in result.verdicts], previous.usage.conversation_tokens
    )


def assert_prefilled(result: GuardResult) -> None:
    """The engine had none of this conversation: its long first message was computed."""
    assert result.usage.computed_tokens >= result.usage.conversation_tokens - 4 * BLOCK, result.usage


def _counter(text: str, name: str) -> dict[str, float]:
    return {labels: float(value) for labels, value in re.findall(rf"^{name}(\{{[^}}]*\}})? ([0-9.e+]+)$", text, re.M)}


def placed(url: str) -> list[int]:
    """Calls the server placed on each data-parallel rank so far."""
    counts = _counter(httpx.get(f"{url}/metrics", timeout=10).text, "guardkit_placement_calls_total")
    return [int(counts.get(f'{{rank="{r}"}}', 0)) for r in range(2)]


def served(url: str) -> int | None:
    """Guard calls a server answered so far (None: it does not answer)."""
    try:
        text = httpx.get(f"{url}/metrics", timeout=10).text
    except httpx.TransportError:
        return None
    return int(sum(_counter(text, "guardkit_guard_calls_total").values()))


# ================================================================ one server, two DP ranks
@pytest.fixture(scope="class")
def dp_server(scale_args: list[str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    log = tmp_path_factory.mktemp("dp") / "server.log"
    port = free_port()
    process = start_server_process([*scale_args, "--data-parallel-size", "2", "--port", str(port)], log)
    try:
        wait_ready(f"http://127.0.0.1:{port}/ready", process, log, timeout=600)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop(process)


class TestDataParallel:
    def test_a_conversation_stays_on_one_rank(self, dp_server: str):
        client = Guardkit(base_url=dp_server, max_retries=0, timeout=120)
        convo, before = Conversation("dp-five-turns"), placed(dp_server)
        previous = None
        for n in range(5):
            if n % 2 == 0:  # the SDK: body and header
                result = client.check(convo.next_turn(n), policies=POLICIES, conversation_id=convo.id)
            else:  # a raw call naming the conversation in the header only
                answer = httpx.post(f"{dp_server}/v1/guard", json={"messages": convo.next_turn(n), "policies": POLICIES},
                                    headers={"X-Guardkit-Conversation": convo.id}, timeout=120)
                assert answer.status_code == 200, answer.text
                result = GuardResult.model_validate(answer.json())
            assert not result.errored
            if previous is not None:
                assert_cached_from_previous_turn(result, previous)
            previous = result
        after = placed(dp_server)
        rank = home_rank(convo.id)
        assert after[rank] - before[rank] == 5 and after[1 - rank] == before[1 - rank], (before, after)

    def test_two_conversations_spread_over_both_ranks(self, dp_server: str):
        client = Guardkit(base_url=dp_server, max_retries=0, timeout=120)
        first, second = ids_on_both_ranks(f"dp-spread-{uuid.uuid4().hex[:6]}")
        same = Conversation("same text").next_turn(0)  # one text, two conversation ids
        before = placed(dp_server)
        a = client.check(same, policies=POLICIES, conversation_id=first)
        b = client.check(same, policies=POLICIES, conversation_id=second)
        again = client.check(same, policies=POLICIES, conversation_id=first)
        assert_prefilled(a)
        assert_prefilled(b)  # not where ``first`` ran: nothing of the text was cached there
        assert_cached_from_previous_turn(again, a)  # ``first`` again: its rank has it all
        after = placed(dp_server)
        assert [x - y for x, y in zip(after, before)] == ([2, 1] if home_rank(first) == 0 else [1, 2])

    def test_without_an_id_the_leading_messages_keep_a_conversation_together(self, dp_server: str):
        convo, previous = Conversation("unused"), None
        for n in range(3):  # no id, no header: placed by the digest of the first message
            answer = httpx.post(f"{dp_server}/v1/guard", json={"messages": convo.next_turn(n), "policies": POLICIES}, timeout=120)
            result = GuardResult.model_validate(answer.json())
            if previous is not None:
                assert_cached_from_previous_turn(result, previous)
            previous = result


# ================================================================ two replicas behind nginx
NGINX_MAIN = """\
worker_processes 1;
daemon off;
pid {root}/nginx.pid;
error_log {root}/error.log info;
events {{ worker_connections 256; }}
http {{
    log_format affinity '$http_x_guardkit_conversation|$upstream_addr|$upstream_status|$status';
    access_log {root}/access.log affinity;
    client_body_temp_path {root}/body;
    proxy_temp_path {root}/proxy;
    fastcgi_temp_path {root}/fastcgi;
    uwsgi_temp_path {root}/uwsgi;
    scgi_temp_path {root}/scgi;
    include {root}/guardkit.conf;
}}
"""


def render_nginx(root: Path, port: int, replicas: list[int]) -> Path:
    """docs/deploy/nginx/guardkit.conf with the test's replicas and port, in a main config."""
    snippet = NGINX_SNIPPET.read_text()
    servers = re.findall(r"^\s*server \d+\.\d+\.\d+\.\d+:\d+ [^;]*;\n", snippet, re.M)
    assert len(servers) == 2, "the documented upstream should list two example replicas"
    options = re.match(r"\s*server \S+ ([^;]*);", servers[0]).group(1)  # type: ignore[union-attr]
    lines = "".join(f"    server 127.0.0.1:{p} {options};\n" for p in replicas)
    snippet = snippet.replace(servers[0], lines).replace(servers[1], "")
    snippet = re.sub(r"listen 8600;", f"listen 127.0.0.1:{port};", snippet)
    (root / "guardkit.conf").write_text(snippet)
    for temp in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (root / temp).mkdir(mode=0o777, exist_ok=True)
        (root / temp).chmod(0o777)  # the workers may run as another user
    (root / "nginx.conf").write_text(NGINX_MAIN.format(root=root))
    return root / "nginx.conf"


@dataclass
class Replicas:
    front: str
    urls: list[str]
    processes: list[subprocess.Popen]
    logs: list[Path]
    access_log: Path

    def serving(self, client: Guardkit, convo: Conversation, n: int) -> tuple[int, GuardResult]:
        """Turn ``n`` of ``convo`` through the front: which replica answered it, and its result."""
        before = [served(u) for u in self.urls]
        result = client.check(convo.next_turn(n), policies=POLICIES, conversation_id=convo.id)
        after = [served(u) for u in self.urls]
        moved = [i for i, (b, a) in enumerate(zip(before, after)) if b is not None and a is not None and a > b]
        assert len(moved) == 1, (before, after)
        return moved[0], result


@pytest.fixture(scope="class")
def replicas(scale_args: list[str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Replicas]:
    nginx = shutil.which("nginx") or shutil.which("/usr/sbin/nginx")
    if nginx is None:
        pytest.skip("nginx is not installed (scripts/setup.sh installs Debian's nginx)")
    root = tmp_path_factory.mktemp("replicas")
    ports = [free_port(), free_port()]
    logs = [root / f"replica-{i}.log" for i in range(2)]
    with ExitStack() as stack:
        processes = []
        for port, log in zip(ports, logs):  # both start at once
            process = start_server_process([*scale_args, "--port", str(port)], log)
            stack.callback(stop, process)
            processes.append(process)
        urls = [f"http://127.0.0.1:{p}" for p in ports]
        for url, process, log in zip(urls, processes, logs):
            wait_ready(f"{url}/ready", process, log, timeout=600)
        front_port = free_port()
        config = render_nginx(root, front_port, ports)
        checked = subprocess.run([nginx, "-t", "-p", str(root), "-c", str(config)], capture_output=True, text=True)
        assert checked.returncode == 0, checked.stderr
        front = spawn([nginx, "-p", str(root), "-c", str(config)], root / "nginx.out")
        stack.callback(stop, front)
        wait_ready(f"http://127.0.0.1:{front_port}/health", front, root / "error.log", timeout=30)
        yield Replicas(f"http://127.0.0.1:{front_port}", urls, processes, logs, root / "access.log")


class TestReplicasBehindNginx:
    conversations: dict[str, tuple[Conversation, int, GuardResult]] = {}  # id -> (conversation, replica, last result)

    def test_a_conversation_stays_on_one_replica_and_two_spread(self, replicas: Replicas):
        client = Guardkit(base_url=replicas.front, max_retries=0, timeout=120)
        convo = Conversation(f"replica-five-{uuid.uuid4().hex[:6]}")
        homes, previous = set(), None
        for n in range(5):
            home, result = replicas.serving(client, convo, n)
            homes.add(home)
            if previous is not None:
                assert_cached_from_previous_turn(result, previous)
            previous = result
        assert len(homes) == 1, homes
        assert previous is not None
        self.conversations["x"] = (convo, homes.pop(), previous)
        # A second conversation on the other replica: ids are hashed by nginx, so try a few.
        for i in range(40):
            other = Conversation(f"replica-other-{i}-{uuid.uuid4().hex[:6]}")
            home, result = replicas.serving(client, other, 0)
            if home != self.conversations["x"][1]:
                self.conversations["y"] = (other, home, result)
                break
        assert "y" in self.conversations, "40 conversations all hashed to one replica"

    def test_a_replica_whose_engine_dies_stops_getting_traffic_and_its_conversations_move(self, replicas: Replicas):
        if "x" not in self.conversations or "y" not in self.conversations:
            pytest.skip("needs the conversations of the test before")
        client = Guardkit(base_url=replicas.front, max_retries=0, timeout=120)
        x, x_home, x_last = self.conversations["x"]
        y, y_home, y_last = self.conversations["y"]
        dead = replicas.processes[x_home]
        cores = [p for p in psutil.Process(dead.pid).children(recursive=True) if "EngineCore" in " ".join(p.cmdline()) + p.name()]
        assert cores, "no engine core process found"
        cores[0].send_signal(signal.SIGKILL)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # until the replica says so (the call in flight then fails closed)
            try:
                if httpx.get(f"{replicas.urls[x_home]}/ready", timeout=2).status_code == 503:
                    break
            except httpx.TransportError:
                break
            time.sleep(0.1)
        # x's next turn: nginx finds its replica failing (503, then refused) and hands it on.
        moved, result = replicas.serving(client, x, 5)
        assert moved == 1 - x_home and not result.errored
        assert_prefilled(result)  # one full prefill on the new replica ...
        moved, again = replicas.serving(client, x, 6)
        assert moved == 1 - x_home
        assert_cached_from_previous_turn(again, result)  # ... then cached again
        assert dead.wait(timeout=60) == 3, replicas.logs[x_home].read_text()[-3000:]
        # y lived on the surviving replica all along: untouched, still cached.
        _, y_next = replicas.serving(client, y, 1)
        assert_cached_from_previous_turn(y_next, y_last)
        # Every call since the death was answered by the live replica (nginx's own log: the
        # last upstream tried per request).
        dead_addr = replicas.urls[x_home].removeprefix("http://")
        last = [line.split("|") for line in replicas.access_log.read_text().splitlines()[-3:]]
        assert [(row[0], row[1].split(", ")[-1] != dead_addr, row[3]) for row in last] == [
            (x.id, True, "200"), (x.id, True, "200"), (y.id, True, "200")
        ], last
