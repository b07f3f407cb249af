"""The `bentoformers` command line as users run it: models, serve, bench against a real server, README."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys

from helpers import ROOT


def bentoformers(*args, timeout=120):
    command = [sys.executable, "-m", "bentoformers.cli", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def test_models_lists_the_built_variants_with_fidelity(minilm_path):
    out = bentoformers("models")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].split()[:3] == ["TAG", "TASK", "PRECISION"]
    for precision in ("int8", "fp32"):
        (row,) = [line for line in lines if line.startswith(f"minilm-{precision}:")]
        assert re.search(rf" embeddings +{precision} +min_cosine [01]\.\d{{5}} .* [\d.]+ MiB ", row), row
    rows = json.loads(bentoformers("models", "--json").stdout)
    int8 = next(r for r in rows if r["name"] == "minilm-int8")
    assert int8["task"] == "embeddings" and int8["size_bytes"] > 1e6
    assert set(int8["validation"]) == {"min_cosine", "mean_cosine", "neighbour_overlap"}


def test_serve_dry_run_checks_the_store_and_shows_the_command(minilm_path):
    out = bentoformers("serve", "--port", "3999", "--max-items-per-request", "64", "--dry-run")
    assert out.returncode == 0, out.stderr
    assert "serving minilm" in out.stderr
    assert "BENTOFORMERS_MAX_ITEMS_PER_REQUEST=64" in out.stdout and "serve service:Gateway" in out.stdout


def test_serve_names_the_fix_when_the_model_is_not_built(minilm_path):
    out = bentoformers("serve", "--models", "not-built", "--dry-run")
    assert out.returncode == 2 and "bentoformers build" in out.stderr


def test_bench_end_to_end_writes_json_and_a_plot(server, tmp_path):
    out = bentoformers("bench", server, "-c", "1,2", "-n", "1,4", "--duration", "0.3", "--warmup", "0.1",
                       "--json", str(tmp_path / "b.json"), "--plot", str(tmp_path / "b.png"))
    assert out.returncode == 0, out.stderr
    report = json.loads((tmp_path / "b.json").read_text())
    points = report["points"]
    assert "minilm" in [m["id"] for m in report["target"]["served_models"]]  # from GET /v1/models
    assert [(p["texts_per_request"], p["concurrency"]) for p in points] == [(1, 1), (1, 2), (4, 1), (4, 2)]
    for p in points:
        assert p["ok"] > 0 and p["errors"] == {} and p["items_per_s"] > 0
        assert p["p50_ms"] <= p["p95_ms"] <= p["p99_ms"]
        assert p["server_rss_mib"] > 50 and p["server_cpu_ms_per_request"] > 0  # found by port: the server runs here
    assert "texts/s" in out.stdout and "p99 ms" in out.stdout
    import matplotlib.image

    image = matplotlib.image.imread(tmp_path / "b.png")
    assert image.shape[0] > 300 and image.shape[1] > 600


def test_bench_drives_the_openai_route_as_it_would_a_peer(server, tmp_path, sentences):
    # The OpenAI shape has no `truncate`: texts over the model's 256 tokens (a few shipped ones) would get 413.
    short = tmp_path / "short.txt"
    short.write_text("\n".join(s for s in sentences if len(s) < 400))
    out = bentoformers("bench", server, "--api", "openai", "--model", "minilm", "-c", "2", "-n", "3", "--texts", str(short),
                       "--duration", "0.3", "--warmup", "0", "--json", str(tmp_path / "b.json"),
                       "--plot", str(tmp_path / "b.png"))
    assert out.returncode == 0, out.stderr
    report = json.loads((tmp_path / "b.json").read_text())
    assert report["target"]["route"] == "/v1/embeddings"
    (point,) = report["points"]
    assert point["ok"] > 0 and point["errors"] == {}


def test_bench_of_a_dead_server_fails_and_says_why(tmp_path):
    from helpers import free_port

    out = bentoformers("bench", f"http://127.0.0.1:{free_port()}", "-c", "1", "-n", "1", "--duration", "0.2", "--warmup", "0",
                       "--json", str(tmp_path / "b.json"), "--plot", str(tmp_path / "b.png"))
    assert out.returncode == 1 and "no successful answer" in out.stderr and "connection" in out.stderr


def test_readme_cli_examples_run(server, tmp_path):
    readme = (ROOT / "README.md").read_text()
    text = readme[readme.index("## Command line") :]
    text = text[: text.index("\n## ")]
    lines = [line for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S)
             for line in block.splitlines() if line.startswith("bentoformers ")]
    assert {line.split()[1] for line in lines} >= {"models", "serve", "bench"}
    for line in lines:
        argv = shlex.split(line.replace("http://localhost:3000", server))[1:]
        if argv[0] == "serve":
            argv.append("--dry-run")  # the server itself is started by the `server` fixture
        if argv[0] == "bench":  # shortened: the README's run takes minutes
            argv += ["--duration", "0.2", "--warmup", "0", "-c", "1", "-n", "1",
                     "--json", str(tmp_path / "b.json"), "--plot", str(tmp_path / "b.png")]
        out = bentoformers(*argv, timeout=300)
        assert out.returncode == 0, f"{line}\n{out.stderr[-2000:]}"


def test_bench_model_only_times_the_built_variants_as_the_service_runs_them(minilm_path):
    out = bentoformers("bench", "--model-only", "-n", "1,8", "--duration", "0.2")
    assert out.returncode == 0, out.stderr
    assert re.search(r"^the built model in process on .+ \((avx2|avx512|avx-vnni|avx512-vnni|sse), \d+ CPUs\)", out.stdout)
    for label in ("int8, 1 text/call", "int8, 8 texts/call", "fp32, 1 text/call", "fp32, 8 texts/call"):
        assert re.search(
            rf"^  {re.escape(label)}: \d+\.\d texts/s, p50 \d+\.\d\d ms/call "
            rf"\(\d+ thread\(s\) per sub-batch(, \d+ for a lone text( of \d+ tokens or more| under \d+ tokens)?)?\)$",
            out.stdout, re.M,
        ), out.stdout


def test_bench_generation_builds_its_model_serves_it_and_times_decoding_alone(minilm_path, tmp_path):
    out = bentoformers("bench", "--generation", "-c", "1,2", "--duration", "1", "--warmup", "0.2",
                       "--max-tokens", "8", "--json", str(tmp_path / "g.json"), timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads((tmp_path / "g.json").read_text())
    assert [p["concurrency"] for p in report["points"]] == [1, 2]
    for point in report["points"]:
        assert point["streams"] > 0 and point["failures"] == 0 and point["tokens_per_s"] > 0
        assert point["ttft_p50_ms"] > 0 and point["itl_p50_ms"] is not None
    alone = report["alone_in_process"]
    assert alone["streams"] > 0 and alone["tokens_per_s"] > 0
    assert re.search(r"^concurrency 2: \d+\.\d\d× the tokens/s of concurrency 1; TTFT p99 = ", out.stdout, re.M)
    assert re.search(r"^alone .* <- one sequence at a time, in process", out.stdout, re.M)
