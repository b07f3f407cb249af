"""The command line's parsing, checks and messages, without a model or a server."""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
import time

import pytest

from bentoformers import cli
from bentoformers.tools import load


def run(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("command", ["build", "serve", "models", "keys", "bench"])
def test_every_command_has_help(capsys, command):
    with pytest.raises(SystemExit) as exited:
        cli.main([command, "--help"])
    assert exited.value.code == 0
    assert "usage: bentoformers " + command in capsys.readouterr().out


def test_top_level_help_lists_commands_and_exit_codes(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = capsys.readouterr().out
    assert all(c in out for c in ("build", "serve", "models", "keys", "bench")) and "exit codes" in out


def test_serve_has_a_flag_per_setting(capsys):
    from bentoformers.settings import Settings

    with pytest.raises(SystemExit):
        cli.main(["serve", "--help"])
    out = capsys.readouterr().out
    for name, field in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-") + " "
        secret = "SecretStr" in str(field.annotation)
        assert (flag in out) != secret, name  # secrets stay out of the command line (ps shows it to all)


def test_serve_refuses_a_bad_setting_naming_the_flag(capsys, tmp_path):
    code, _, err = run(capsys, "serve", "--working-dir", str(tmp_path), "--max-items-per-request", "0")
    assert code == cli.USAGE
    assert "--max-items-per-request" in err and "greater than or equal to 1" in err


def test_serve_outside_the_project_says_where_to_run_it(capsys, tmp_path):
    code, _, err = run(capsys, "serve", "--working-dir", str(tmp_path))
    assert code == cli.USAGE and "no service.py" in err and "--working-dir" in err


def test_serve_dry_run_of_a_bento_tag_maps_flags_to_the_environment(capsys):
    code, out, _ = run(capsys, "serve", "bentoformers:latest", "--port", "4000", "--max-queued-items", "64",
                       "--precision", "fp32", "--dry-run", "--", "--development")
    assert code == cli.OK
    assert "BENTOFORMERS_MAX_QUEUED_ITEMS=64" in out and "BENTOFORMERS_PRECISION=fp32" in out
    assert out.rstrip().endswith("serve bentoformers:latest --host 127.0.0.1 --port 4000 --development")


def test_serve_listens_on_loopback_only_when_it_would_run_open_unless_told_a_host(capsys, monkeypatch, tmp_path):
    for name in ("API_KEYS_FILE", "API_KEYS", "JWT_SECRET", "JWT_PUBLIC_KEY_FILE", "AUTH"):
        monkeypatch.delenv("BENTOFORMERS_" + name, raising=False)
    monkeypatch.delenv("BENTOML_CONTAINERIZED", raising=False)
    code, out, err = run(capsys, "serve", "bentoformers:latest", "--dry-run")
    assert code == cli.OK and "--host 127.0.0.1 " in out
    assert "listening on 127.0.0.1 only" in err and "--host 0.0.0.0" in err
    code, out, err = run(capsys, "serve", "bentoformers:latest", "--auth", "disabled", "--dry-run")
    assert "--host 127.0.0.1 " in out
    code, out, err = run(capsys, "serve", "bentoformers:latest", "--host", "0.0.0.0", "--dry-run")
    assert code == cli.OK and "--host 0.0.0.0 " in out and "127.0.0.1" not in err  # asked for: as asked
    (tmp_path / "keys.yaml").write_text("[]\n")
    monkeypatch.setenv("BENTOFORMERS_API_KEYS_FILE", str(tmp_path / "keys.yaml"))
    code, out, err = run(capsys, "serve", "bentoformers:latest", "--dry-run")
    assert code == cli.OK and "--host 0.0.0.0 " in out  # credentials asked for: every interface, as before


def test_serve_choices_come_from_the_settings(capsys):
    with pytest.raises(SystemExit) as exited:
        cli.main(["serve", "--precision", "fp64"])
    assert exited.value.code == cli.USAGE and "invalid choice" in capsys.readouterr().err


def test_build_without_a_model_list_says_how_to_fix_it(capsys, tmp_path):
    code, _, err = run(capsys, "build", "--models", str(tmp_path / "missing.yaml"))
    assert code == cli.USAGE and "--models" in err


@pytest.mark.parametrize("argv", [["bench", "-c", "0"], ["bench", "-n", "x,2"]])
def test_bench_refuses_bad_sweeps(capsys, argv):
    with pytest.raises(SystemExit) as exited:
        cli.main(argv)
    assert exited.value.code == cli.USAGE


def test_passthrough_only_for_serve(capsys):
    code, _, err = run(capsys, "models", "--", "--x")
    assert code == cli.USAGE and "bentoml serve only" in err


def test_bench_finds_a_local_listener_and_samples_its_memory_and_cpu():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert load.listening_pid(f"http://127.0.0.1:{port}") == os.getpid()
    assert load.listening_pid("http://example.invalid:80") is None  # not this machine: no lookup
    # a "server" of its own, idle until told to spend 0.2 s of CPU (this process may have others running)
    busy = "import sys, time\nprint(flush=True)\nsys.stdin.readline()\nend = time.process_time() + 0.2\n" \
           "while time.process_time() < end:\n    pass\nprint(flush=True)\nsys.stdin.readline()\n"
    server = subprocess.Popen([sys.executable, "-c", busy], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        server.stdout.readline()  # started
        sampler = load.ServerSampler(server.pid, every=0.01)
        time.sleep(0.1)
        assert sampler.cpu_seconds() < 0.05  # waiting costs no CPU
        sampler.reset()
        server.stdin.write("\n")
        server.stdin.flush()
        server.stdout.readline()  # done
        assert 0.15 < sampler.cpu_seconds() < 0.6
        sampler.stop()
        assert sampler.peak_mib() > 5
    finally:
        server.kill()
        server.wait()
    assert load.ServerSampler(None).cpu_seconds() is None


def test_percentiles_are_nearest_rank():
    values = sorted(i / 1000 for i in range(1, 101))  # 1..100 ms
    assert [load.percentile(values, q) for q in (0.5, 0.95, 0.99)] == pytest.approx([50, 95, 99])
    assert load.percentile([], 0.5) is None


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_build_steps_show_their_running_time_on_a_terminal():
    out = _Terminal()
    report = cli.StepTicker(out, every=0.01)
    report("  export to ONNX (optimum) ...")
    deadline = time.monotonic() + 10
    while "... 0s" not in out.getvalue() and time.monotonic() < deadline:
        time.sleep(0.01)
    report("  export to ONNX (optimum): done in 0.1s")
    text = out.getvalue()
    assert "\r  export to ONNX (optimum) ... 0s" in text
    assert text.endswith("\r\x1b[K  export to ONNX (optimum): done in 0.1s\n")


def test_build_steps_are_plain_lines_in_a_log():
    out = io.StringIO()
    report = cli.StepTicker(out)
    report("  step ...")
    report("  step: done in 1.0s")
    assert out.getvalue() == "  step ...\n  step: done in 1.0s\n"


def test_bench_in_process_outside_the_project_says_where_to_run_it(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # no build/models.yaml here
    monkeypatch.delenv("BENTOFORMERS_MODEL_LIST", raising=False)
    assert cli.main(["bench", "--model-only", "--duration", "0.1"]) == cli.USAGE
    err = capsys.readouterr().err
    assert "models.yaml" in err and "run from the project folder" in err and "Traceback" not in err
