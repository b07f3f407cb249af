"""Schemathesis against the published OpenAPI document on a real `bentoml serve` (MiniLM, `sentiment`, `gpt2`):
every documented operation, with valid and invalid bodies (its coverage and fuzzing phases). Zero 5xx, zero
hangs (a request over the timeout fails the run), every answer as documented (status, content type, headers,
schema; 405 for an undocumented method), every error in the one body (schemathesis_hooks.py).

Run through schemathesis's command line: its pytest plugin's lazy loading (the server starts in a fixture)
does not run under pytest 9."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ROOT

from bentoformers.api.routes import ROUTES

CHECKS = ("not_a_server_error", "status_code_conformance", "content_type_conformance", "response_headers_conformance",
          "response_schema_conformance", "negative_data_rejection", "unsupported_method", "one_error_body")
EXAMPLES = 50  # per operation and phase
REQUEST_TIMEOUT = 30  # seconds: an answer slower than this is a hang


@pytest.mark.timeout(1500)  # above the ini timeout (900 s): schemathesis alone may take 1200 s
def test_every_operation_answers_as_documented(server, tmp_path):
    st = shutil.which("st", path=str(Path(sys.executable).parent)) or shutil.which("st")
    assert st, "schemathesis is in the test extra"
    env = {**os.environ, "SCHEMATHESIS_HOOKS": "tests.e2e.schemathesis_hooks", "PYTHONPATH": os.pathsep.join(
        p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    out = subprocess.run(
        [st, "run", f"{server}/openapi.json", "--checks", ",".join(CHECKS), "--max-examples", str(EXAMPLES),
         "--request-timeout", str(REQUEST_TIMEOUT), "--seed", "1", "--no-color"],
        capture_output=True, text=True, timeout=1200, cwd=tmp_path, env=env,  # its cache goes to the cwd
    )
    report = out.stdout + out.stderr
    counts = re.search(r"Test cases:\s*\n\s*(\d+) generated, (\d+) passed", report)
    print("\nschemathesis:", counts.group(0).split("\n", 1)[1].strip() if counts else report[-3000:])
    assert out.returncode == 0, report[-6000:]
    assert counts and int(counts.group(1)) == int(counts.group(2)) > 0, report[-3000:]
    # Every operation it found was tested, and it found at least every route of the route table.
    selected = re.search(r"(\d+) selected / (\d+) total", report)
    assert selected and selected.group(1) == selected.group(2), report[-3000:]
    assert int(selected.group(2)) >= len(ROUTES), report[-3000:]
