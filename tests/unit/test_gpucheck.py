"""The GPU check's verdicts (tools/gpucheck.py); its GPU part runs only where CUDA is."""

from __future__ import annotations

import subprocess
import sys

import pytest

from bentoformers.tools.gpucheck import build_verdict


def test_a_refused_int8_variant_is_a_refusal_and_any_other_refusal_a_failure():
    assert build_verdict("int8", "failed gate") == "refused"  # the gate doing its job on a CPU variant
    assert build_verdict("fp16", "failed gate") == "fail"
    assert build_verdict("fp32", "failed gate") == "fail"
    assert build_verdict("fp16", "skipped") == "fail"  # no GPU to validate fp16 on
    assert build_verdict("int8", "saved") == build_verdict("fp16", "up to date") == "pass"


def test_without_cuda_it_says_so_and_exits_non_zero_at_once(tmp_path):
    from bentoformers.runtime.session import pick_device

    if pick_device() == "cuda":
        pytest.skip("CUDA is here: the check would run")
    report = tmp_path / "gpucheck.json"
    done = subprocess.run([sys.executable, "-m", "bentoformers.tools.gpucheck", "--json", str(report)],
                          check=False, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "no CUDA here" in done.stderr
    assert not report.exists()
