"""What the tests share that is not a fixture (fixtures are in conftest.py): the repository root, the served
models' template and prompts, a JSON POST to the app in process, a real server on a free port, a real Redis,
and a metric's value in a Prometheus page. Test modules import it as `helpers` (tests/ is on sys.path, as for
conftest.py)."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[1]
# The served chat model's template (ChatML, as SmolLM2-Instruct's): written here, saved in its checkpoint.
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# The served e5 model's prompts, as intfloat/e5 checkpoints name them.
E5_PROMPTS = {"query": "query: ", "passage": "passage: "}


def post(client, path: str, body, **kwargs):
    """POST `body` to the app in process (a TestClient) as application/json: a dict or list encoded with orjson,
    bytes or str sent as they are (for bodies that are not valid JSON)."""
    import orjson

    data = body if isinstance(body, (bytes, str)) else orjson.dumps(body)
    return client.post(path, content=data, headers={"content-type": "application/json"}, **kwargs)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class RunningServer:
    url: str
    proc: subprocess.Popen
    log: Path


@contextlib.contextmanager
def running_server(
    args: list[str], log: Path, env: dict[str, str] | None = None, ready_timeout: float = 180
) -> Iterator[RunningServer]:
    """A real server: `args` (a serve command line) with `--host 127.0.0.1 --port N` on a free port, run from ROOT
    with stdout and stderr in `log`, yielded once GET /readyz answers 200; terminated (killed after 30 s) on exit."""
    port = free_port()
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [*args, "--host", "127.0.0.1", "--port", str(port)],
            cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=env,
        )
    server = RunningServer(f"http://127.0.0.1:{port}", proc, log)
    try:
        deadline = time.monotonic() + ready_timeout
        while not _ready(server.url):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"server did not become ready:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def metric_value(page: str, sample: str) -> float:
    """A sample's value in a Prometheus text page, e.g. 'name{label="x"}' (0 when absent)."""
    for line in page.splitlines():
        if line.startswith(sample + " "):
            return float(line.split()[-1])
    return 0.0


def _ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/readyz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


class RedisServer:
    """A real redis-server on a free loopback port that a test can stop and start again."""

    def __init__(self, workdir: Path) -> None:
        self.port, self.workdir, self.proc = free_port(), workdir, None
        self.url = f"redis://127.0.0.1:{self.port}"

    def start(self) -> None:
        import shutil

        exe = shutil.which("redis-server")
        if exe is None:
            if os.environ.get("CI") == "true":
                pytest.fail("redis-server is missing (.ci/run installs it)")
            pytest.skip("redis-server is not installed")
        self.proc = subprocess.Popen(
            [exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            cwd=self.workdir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                time.sleep(0.05)
        self.stop()
        pytest.fail("redis-server did not start within 10 s")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None
