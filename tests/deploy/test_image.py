"""The container path, for real: build the image offline with deploy/build-image.sh from the models
this run built, run it with podman and embed, then run the Kustomize base with `podman kube play`."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml
from deploytools import require_tool
from helpers import ROOT, free_port

# Above the ini timeout (900 s): the image build alone may take 1200 s, in the first test that needs it.
pytestmark = pytest.mark.timeout(1800)

TAG = "localhost/bentoformers:pytest"


def _podman(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "CONTAINERS_CONF": str(ROOT / "deploy" / "image" / "containers.conf")}
    return subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout, env=env)


class _Touch:
    """Unpickling this creates a file: the proof that a body was (or was not) unpickled."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def _logs(name: str) -> str:
    """A container's output: BentoML writes its log to stderr."""
    out = _podman("logs", name)
    return f"== {name}\n{out.stdout}{out.stderr}"


def _wait_ready(url: str, seconds: float, alive=lambda: True) -> float:
    start = time.monotonic()
    while time.monotonic() - start < seconds:
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return time.monotonic() - start
        except httpx.HTTPError:
            pass
        if not alive():
            break
        time.sleep(0.5)
    return -1.0


@pytest.fixture(scope="module")
def image(minilm_build):
    for tool in ("podman", "runc", "debootstrap", "kubectl"):
        require_tool(tool)
    started = time.monotonic()
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    out = subprocess.run(
        ["bash", str(ROOT / "deploy" / "build-image.sh"), "--tag", TAG],
        capture_output=True, text=True, timeout=1200, cwd=ROOT, env=env,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    size = int(_podman("image", "inspect", TAG, "--format", "{{.Size}}").stdout)
    print(f"\nimage {TAG}: built in {time.monotonic() - started:.0f} s, {size / 1e6:.0f} MB\n{out.stdout}")
    yield TAG
    _podman("rmi", "-f", TAG)


@pytest.fixture(scope="module")
def api_key():
    """A real key and its record: BentoML's images refuse to start without credentials."""
    from bentoformers.security.keys import create_key

    key, record = create_key("deploy-test", ["*"], "default", None)
    return key, yaml.safe_dump([record.model_dump(mode="json")], sort_keys=False)


def test_the_image_serves_real_embeddings(image, minilm_path, api_key):
    port = free_port()
    name = f"bentoformers-pytest-{port}"
    started = time.monotonic()
    key, records = api_key
    run = _podman("run", "-d", "--rm", "--name", name, "--network", "host", "-e", f"BENTOML_PORT={port}",
                  "-e", f"BENTOFORMERS_API_KEYS={records}", image)
    assert run.returncode == 0, run.stderr
    try:
        url = f"http://127.0.0.1:{port}"
        ready = _wait_ready(url, 180)
        assert ready >= 0, _podman("logs", name).stdout[-3000:]
        print(f"\ncontainer ready {time.monotonic() - started:.1f} s after podman run")
        body = {"input": ["The cat sat on the mat."]}
        assert httpx.post(f"{url}/v1/embeddings", json=body, timeout=30).status_code == 401
        r = httpx.post(f"{url}/v1/embeddings", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=30)
        assert r.status_code == 200, r.text
        served = np.array(r.json()["data"][0]["embedding"], dtype=np.float32)
        assert served.shape == (384,)

        from bentoformers.runtime.encoder import OnnxEncoder, l2_normalize
        from bentoformers.runtime.tokenizer import TextTokenizer

        tokenizer = TextTokenizer(minilm_path["int8"], 256)
        local = l2_normalize(OnnxEncoder(minilm_path["int8"]).embed(tokenizer.encode(["The cat sat on the mat."], False)))
        np.testing.assert_allclose(served, local[0], atol=1e-5)  # the very model this run built, in the image
        assert "bentoformers_inference_seconds_count" in httpx.get(f"{url}/metrics").text
        logged = [json.loads(line) for line in _podman("logs", name).stdout.splitlines() if line.startswith('{"time"')]
        assert [(e["status"], e["identity"]) for e in logged if e["route"] == "/v1/embeddings"] == [
            (401, None), (200, "key:deploy-test")]
        assert key not in _podman("logs", name).stdout + _podman("logs", name).stderr
    finally:
        _podman("stop", "-t", "10", name)


def test_kube_play_runs_the_base_until_ready(image, api_key, tmp_path):
    port = free_port()
    overlay = tmp_path / "overlay"
    overlay.mkdir()
    name, tag = image.split(":")
    (overlay / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": [os.path.relpath(ROOT / "deploy" / "k8s" / "overlays" / "podman", overlay)],
        "images": [{"name": "localhost/bentoformers", "newName": name, "newTag": tag}],
        # kube play publishes container ports on the host: pick a free one.
        "patches": [{"target": {"kind": "Deployment", "name": "bentoformers"}, "patch": yaml.safe_dump([
            {"op": "add", "path": "/spec/template/spec/containers/0/ports/0/hostPort", "value": port},
        ])}],
    }))
    rendered = subprocess.run(["kubectl", "kustomize", str(overlay)], capture_output=True, text=True, timeout=60)
    assert rendered.returncode == 0, rendered.stderr
    manifest = tmp_path / "bentoformers.yaml"
    manifest.write_text(rendered.stdout)
    key, records = api_key
    keys = tmp_path / "keys-configmap.yaml"
    keys.write_text(yaml.safe_dump({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "bentoformers-keys"},
                                    "data": {"BENTOFORMERS_API_KEYS": records}}))
    started = time.monotonic()
    try:
        play = _podman("kube", "play", "--network", "slirp4netns", "--configmap", str(keys), str(manifest), timeout=180)
        assert play.returncode == 0, play.stdout + play.stderr
        ready = _wait_ready(f"http://127.0.0.1:{port}", 180)
        logs = _podman("pod", "logs", "bentoformers-pod").stdout
        assert ready >= 0, logs[-3000:]
        print(f"\nkube play: ready {time.monotonic() - started:.1f} s after play")
        r = httpx.post(f"http://127.0.0.1:{port}/embed", json={"inputs": "hello"},
                       headers={"Authorization": f"Bearer {key}"}, timeout=30)
        assert r.status_code == 200 and len(r.json()["embeddings"][0]) == 384
    finally:
        _podman("kube", "play", "--down", str(manifest), timeout=120)


def test_gpu_split_runs_with_the_manifests_args_on_cpu(image, api_key, tmp_path):
    """The gpu component's two Deployments, run as two containers with their rendered args (CPU here)."""
    overlay = tmp_path / "overlay"
    overlay.mkdir()
    (overlay / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": [os.path.relpath(ROOT / "deploy" / "k8s" / "base", overlay)],
        "components": [os.path.relpath(ROOT / "deploy" / "k8s" / "components" / "gpu", overlay)],
    }))
    rendered = subprocess.run(["kubectl", "kustomize", str(overlay)], capture_output=True, text=True, timeout=60)
    assert rendered.returncode == 0, rendered.stderr
    pods = {d["metadata"]["name"]: d["spec"]["template"]["spec"]["containers"][0]
            for d in yaml.safe_load_all(rendered.stdout) if d and d["kind"] == "Deployment"}
    model_port, gateway_port, metrics_port = free_port(), free_port(), free_port()
    gateway_args = [a.replace("http://bentoformers-model:3000", f"http://127.0.0.1:{model_port}")
                    for a in pods["bentoformers"]["args"]]
    key, records = api_key
    # The model pod's own env from the manifest, but on CPU: there is no GPU here.
    # The internal token comes from a Secret in the manifests: the same value for both here.
    token = {"BENTOFORMERS_INTERNAL_TOKEN": "deploy-test-internal-token-" + "z" * 20}
    model_env = {e["name"]: e["value"] for e in pods["bentoformers-model"]["env"] if "value" in e}
    model_env |= {"BENTOFORMERS_DEVICE": "cpu", "BENTOFORMERS_METRICS_PORT": str(metrics_port)} | token
    gateway_env = {e["name"]: e["value"] for e in pods["bentoformers"]["env"] if "value" in e}
    gateway_env |= {"BENTOFORMERS_API_KEYS": records} | token
    names = []
    try:
        for port, args, env in ((model_port, pods["bentoformers-model"]["args"], model_env),
                                (gateway_port, gateway_args, gateway_env)):
            names.append(f"bentoformers-pytest-{port}")
            flags = [f"--env={k}={v}" for k, v in {**env, "BENTOML_PORT": str(port)}.items()]
            run = _podman("run", "-d", "--rm", "--name", names[-1], "--network", "host", *flags, image, *args)
            assert run.returncode == 0, run.stderr
        url = f"http://127.0.0.1:{gateway_port}"
        assert _wait_ready(url, 180) >= 0, "\n".join(_logs(name)[-3000:] for name in names)
        r = httpx.post(f"{url}/embed", json={"inputs": ["split services"]},
                       headers={"Authorization": f"Bearer {key}"}, timeout=30)
        assert r.status_code == 200 and len(r.json()["embeddings"][0]) == 384
        # The model runs in the model container only: its metrics port has the inference time, the gateway's not.
        scraped = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text
        assert "bentoformers_inference_seconds_count" in scraped
        assert "bentoformers_inference_seconds_count" not in httpx.get(f"{url}/metrics").text
        # Anyone but the gateway: a pickled body is refused unread (415), anything else 401, /metrics included.
        model_url = f"http://127.0.0.1:{model_port}"
        marker = "/tmp/unpickled-" + names[0]
        evil = pickle.dumps(_Touch(marker))
        r = httpx.post(f"{model_url}/embed", content=evil, headers={"Content-Type": "application/vnd.bentoml+pickle"})
        assert r.status_code == 415 and r.json()["error"]["type"] == "invalid_request_error", r.text
        assert _podman("exec", names[0], "test", "-e", marker).returncode == 1  # never unpickled
        assert httpx.post(f"{model_url}/embed", json={"token_ids": [[101, 102]]}).status_code == 401
        assert httpx.get(f"{model_url}/metrics").status_code == 401
    finally:
        for name in names:
            _podman("stop", "-t", "10", name)
