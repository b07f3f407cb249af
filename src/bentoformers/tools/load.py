"""The load generator the benchmarks share: texts, a closed loop of clients, a local server, its memory, timings.

`bentoformers bench` (bench.py) and its `--generation` (bench_generation.py) and `--rerank` (bench_rerank.py)
sweeps all take their pieces from here, and none of them from another.
"""

from __future__ import annotations

import asyncio
import math
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from bentoformers.exits import CliError

LOOPBACK = {"127.0.0.1", "localhost", "::1", "0.0.0.0", ""}
DISTINCT_BODIES = 64  # request bodies are encoded up front, so the load generator spends its CPU on HTTP


def served_models(base: str, api_key: str | None) -> list[dict[str, Any]]:
    """What GET /v1/models says is served (model, precision, device), for the record; [] if it does not say."""
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        response = httpx.get(base + "/v1/models", headers=headers, timeout=10)
        return list(response.json()["data"]) if response.status_code == 200 else []
    except (httpx.HTTPError, ValueError, KeyError, TypeError):
        return []


def event_loop_runner() -> Any:
    # uvloop, where installed, keeps the load generator's own overhead down (it shares the machine).
    try:
        import uvloop

        return uvloop.run
    except ImportError:
        return asyncio.run


def load_texts(path: Path | None) -> list[str]:
    if path is None:
        from importlib.resources import files

        source = files("bentoformers").joinpath("data/sentences.txt").read_text(encoding="utf-8")
    else:
        source = path.read_text(encoding="utf-8")
    texts = [line.strip() for line in source.splitlines() if line.strip()]
    random.Random(0).shuffle(texts)
    return texts


# ---- load ---------------------------------------------------------------------------------------------


async def closed_loop(
    session: Any, url: str, bodies: list[bytes], concurrency: int, seconds: float, honour_retry_after: bool = False
) -> dict[str, Any]:
    """`concurrency` clients, each sending its next request when the last is answered, for `seconds` (those in
    flight then are awaited). A refused client sends again at once, or with `honour_retry_after` after the
    server's Retry-After (an SDK's behaviour)."""
    import aiohttp

    from bentoformers.client import parse_retry_after

    latencies: list[float] = []
    refusals: list[float] = []  # how long a 429 or 503 took to come back
    statuses: Counter[str] = Counter()
    stop = time.perf_counter() + seconds

    async def client(k: int) -> None:
        i = k
        while time.perf_counter() < stop:
            body = bodies[i % len(bodies)]
            i += concurrency
            start = time.perf_counter()
            wait = 0.0
            try:
                async with session.post(url, data=body) as response:
                    await response.read()
                    status = str(response.status)
                    if honour_retry_after and response.status in (429, 503):
                        wait = parse_retry_after(response.headers.get("Retry-After")) or 0.0
            except TimeoutError:
                status = "timeout"
            except aiohttp.ClientError:
                status = "connection"
                await asyncio.sleep(0.05)  # a refused connection fails at once; do not spin
            statuses[status] += 1
            if status == "200":
                latencies.append(time.perf_counter() - start)
            elif status in ("429", "503"):
                refusals.append(time.perf_counter() - start)
            if wait:
                await asyncio.sleep(min(wait, max(0.0, stop - time.perf_counter())))

    started = time.perf_counter()
    await asyncio.gather(*(client(k) for k in range(concurrency)))
    elapsed = time.perf_counter() - started
    latencies.sort()
    refusals.sort()
    ok = statuses.pop("200", 0)
    return {
        "ok": ok,
        "elapsed_s": elapsed,
        "requests_per_s": ok / elapsed,
        "p50_ms": percentile(latencies, 0.50),
        "p95_ms": percentile(latencies, 0.95),
        "p99_ms": percentile(latencies, 0.99),
        "refused_p50_ms": percentile(refusals, 0.50),
        "refused_p99_ms": percentile(refusals, 0.99),
        "errors": dict(statuses),
    }


def percentile(sorted_seconds: list[float], q: float) -> float | None:
    if not sorted_seconds:
        return None
    return 1e3 * sorted_seconds[min(len(sorted_seconds) - 1, max(0, math.ceil(q * len(sorted_seconds)) - 1))]


def time_calls(
    call: Callable[[Any], object], argument: Callable[[int], Any], seconds: float
) -> tuple[list[float], float]:
    """`call(argument(n))` for n = 0, 1, 2, ... until `seconds` have passed, in this process: the seconds each call
    took (its argument made outside that time) and the seconds of the whole loop."""
    calls: list[float] = []
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        arg = argument(len(calls))
        began = time.perf_counter()
        call(arg)
        calls.append(time.perf_counter() - began)
    return calls, time.perf_counter() - start


# ---- the server: started here, or found by port; its memory -------------------------------------------


class LocalServer:
    """`bentoml serve service:Gateway` from the current folder on a free loopback port."""

    def __init__(self, proc: subprocess.Popen[bytes], url: str, log: Path) -> None:
        self.proc, self.url, self.log = proc, url, log

    @property
    def pid(self) -> int:
        return self.proc.pid

    @classmethod
    def start(cls, timeout: float = 180.0, env: dict[str, str] | None = None) -> LocalServer:
        import httpx


        if not Path("service.py").is_file():
            raise CliError("no URL given and no service.py here: pass the server's URL, or run from the project folder")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        log = Path(tempfile.mkdtemp(prefix="bentoformers-bench-")) / "serve.log"
        cmd = [sys.executable, "-m", "bentoml", "serve", "service:Gateway", "--host", "127.0.0.1", "--port", str(port)]
        with open(log, "wb") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        server = cls(proc, f"http://127.0.0.1:{port}", log)
        print(f"started a local server at {server.url} (log: {log})", file=sys.stderr)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if httpx.get(server.url + "/readyz", timeout=2).status_code == 200:
                    return server
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        server.stop()
        tail = log.read_text(errors="replace")[-2000:]
        raise CliError(f"the local server did not become ready (is the model built? `bentoformers build`):\n{tail}")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def listening_pid(url: str) -> int | None:
    """The top process listening on the URL's port, when that is on this machine."""
    parts = urlsplit(url)
    if parts.hostname not in LOOPBACK:
        return None
    import psutil

    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        pids = {c.pid for c in psutil.net_connections("tcp") if c.laddr and c.laddr.port == port
                and c.status == psutil.CONN_LISTEN and c.pid}
    except psutil.AccessDenied:
        return None
    for pid in pids:  # bentoml's workers share the socket of the process that started them
        try:
            if not {p.pid for p in psutil.Process(pid).parents()} & pids:
                return pid
        except psutil.NoSuchProcess:
            continue
    return None


class ServerSampler:
    """Peak RSS of a process and its children, sampled in the background, and the CPU time they spent since the
    last `reset` (what a request costs the server, load generator apart)."""

    def __init__(self, pid: int | None, every: float = 0.2) -> None:
        self._peak = 0
        self._stop = threading.Event()
        self._process = None
        self._cpu_at_reset: dict[int, float] = {}
        if pid is None:
            return
        import psutil

        try:
            self._process = psutil.Process(pid)
        except psutil.Error:
            return
        self._cpu_at_reset = self._cpu_by_process()
        threading.Thread(target=self._sample, args=(every,), daemon=True).start()

    def _tree(self) -> list:
        return [self._process, *self._process.children(recursive=True)]

    def _cpu_by_process(self) -> dict[int, float]:
        import psutil

        seconds = {}
        try:
            for p in self._tree():
                try:
                    times = p.cpu_times()
                    seconds[p.pid] = times.user + times.system
                except psutil.NoSuchProcess:
                    pass
        except psutil.Error:
            pass
        return seconds

    def _sample(self, every: float) -> None:
        import psutil

        while not self._stop.wait(every):
            try:
                rss = 0
                for p in self._tree():
                    try:
                        rss += p.memory_info().rss
                    except psutil.NoSuchProcess:
                        pass
                self._peak = max(self._peak, rss)
            except psutil.Error:
                return

    def reset(self) -> None:
        if self._process is not None:
            self._peak = 0
            self._cpu_at_reset = self._cpu_by_process()

    def peak_mib(self) -> float | None:
        return round(self._peak / 2**20, 1) if self._peak else None

    def cpu_seconds(self) -> float | None:
        """CPU time (user and system) of the process tree since the last reset; None when it cannot be read."""
        if self._process is None:
            return None
        now = self._cpu_by_process()
        return sum(max(0.0, t - self._cpu_at_reset.get(pid, 0.0)) for pid, t in now.items()) if now else None

    def stop(self) -> None:
        self._stop.set()


# ---- output -------------------------------------------------------------------------------------------


def format_errors(errors: dict[str, int]) -> str:
    return ", ".join(f"{status}×{n}" for status, n in sorted(errors.items())) or "-"


def format_ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"
