"""The client side with the core dependencies only (httpx, pydantic, pyyaml and what they need), as
`pip install bentoformers` without extras leaves it: no BentoML, no numpy, no server packages."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import ROOT

CORE = ["httpx", "httpcore", "h11", "anyio", "sniffio", "idna", "certifi", "pydantic", "pydantic_core",
        "annotated_types", "typing_extensions", "typing_inspection", "yaml"]


@pytest.fixture(scope="module")
def core_only(tmp_path_factory) -> Path:
    """A folder that holds only the core packages (linked from this environment)."""
    folder = tmp_path_factory.mktemp("core-only")
    for name in CORE:
        spec = importlib.util.find_spec(name)
        if spec is None:
            continue  # not every version needs every one of these
        origin = Path(spec.origin)
        source = origin.parent if origin.name == "__init__.py" else origin
        (folder / source.name).symlink_to(source)
    return folder


def run(core_only: Path, code: str) -> subprocess.CompletedProcess[str]:
    # -S: no site-packages, so only the core folder and the project's source are importable.
    prelude = f"import sys; sys.path[:0] = [{str(core_only)!r}, {str(ROOT / 'src')!r}]\n"
    return subprocess.run([sys.executable, "-S", "-c", prelude + textwrap.dedent(code)],
                          capture_output=True, text=True, timeout=60)


def test_the_client_works_without_server_packages(core_only):
    out = run(core_only, """
        import httpx
        import bentoformers
        from bentoformers import Client
        try:
            import bentoml
        except ImportError:
            pass
        else:
            raise SystemExit("bentoml is importable: the test does not isolate")
        body = {"model": "m", "embeddings": [[0.5]], "usage": {"prompt_tokens": 1, "total_tokens": 1}}
        transport = httpx.MockTransport(lambda request: httpx.Response(200, json=body))
        with Client("http://s", transport=transport) as client:
            print(client.embed("x").embeddings, bentoformers.AsyncClient.__name__)
        """)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[[0.5]] AsyncClient"


@pytest.mark.parametrize("command,extra", [("models", "serve"), ("serve", "serve"), ("bench", "bench"),
                                           ("build", "build")])
def test_the_command_line_says_which_extra_to_install(core_only, command, extra):
    out = run(core_only, f"""
        from bentoformers import cli
        raise SystemExit(cli.main([{command!r}]))
        """)
    assert out.returncode == 2, out.stderr
    assert f"pip install 'bentoformers[{extra}]'" in out.stderr
