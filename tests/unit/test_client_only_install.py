"""The client side with the core dependencies only (httpx, pydantic, pyyaml and what they need), as
`pip install bentoformers` without extras leaves it: no BentoML, no numpy, no server packages."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from helpers import ROOT

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


def test_a_built_wheel_is_a_working_client_install(core_only, tmp_path):
    """The README's calling-side install: a wheel built from the project, installed without extras, needs only
    the core packages and holds what the client uses (built from a copy: the checkout's build/ is the model list)."""
    import shutil
    import zipfile

    source = tmp_path / "project"
    shutil.copytree(ROOT / "src", source / "src", ignore=shutil.ignore_patterns("*.egg-info", "__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    dist, site = tmp_path / "dist", tmp_path / "site"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    built = subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(dist), str(source)],
                           capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr
    (wheel,) = dist.glob("bentoformers-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        metadata = archive.read(next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))).decode()
        assert "bentoformers/data/sentences.txt" in archive.namelist()
    requires = [line.split(": ", 1)[1] for line in metadata.splitlines() if line.startswith("Requires-Dist: ")]
    assert {r for r in requires if "extra ==" not in r} == {"httpx>=0.27", "pydantic>=2.7", "pyyaml>=6"}
    installed = subprocess.run([*pip, "install", "--no-deps", "--no-index", "--target", str(site), str(wheel)],
                               capture_output=True, text=True, timeout=300)
    assert installed.returncode == 0, installed.stderr
    code = f"""
import sys; sys.path[:0] = [{str(core_only)!r}, {str(site)!r}]
import httpx, bentoformers
assert bentoformers.__file__.startswith({str(site)!r}), bentoformers.__file__
body = {{"model": "m", "embeddings": [[0.5]], "usage": {{"prompt_tokens": 1, "total_tokens": 1}}}}
with bentoformers.Client("http://s", transport=httpx.MockTransport(lambda r: httpx.Response(200, json=body))) as c:
    print(c.embed("x").embeddings)
"""
    out = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[[0.5]]"
