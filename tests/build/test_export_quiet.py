"""The export prints none of the framework warnings a user cannot act on (tracer notes, `torch_dtype`
deprecated, "requires accelerate"), as a build run from the command line would show them."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from helpers import ROOT


def test_exporting_a_causal_lm_prints_no_framework_warnings(tmp_path):
    code = textwrap.dedent(f"""
        from pathlib import Path
        from bentoformers.build.export import export_onnx
        from bentoformers.tools.tiny_models import make_tiny_gpt2
        folder = make_tiny_gpt2(Path({str(tmp_path / "gpt2")!r}))
        print(export_onnx(folder, Path({str(tmp_path / "onnx")!r}), task="generation").is_file())
        """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("True")
    for noise in ("TracerWarning", "UserWarning", "torch_dtype", "requires accelerate"):
        assert noise not in out.stderr, out.stderr[-3000:]
