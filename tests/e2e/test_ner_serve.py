"""POST /ner on a real `bentoml serve` (the trained tiny `ner` model): the README's examples, our client and
BentoML's, and concurrent requests that get what they get alone."""

from __future__ import annotations

import concurrent.futures
import re
import subprocess
import sys

import httpx
from helpers import ROOT

TEXT = "On Monday, 3 trains left Paris for Berlin and Tokyo in March."


def test_the_readme_ner_examples_run(server):
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("### Token classification (NER)") : readme.index("### Chat")]
    blocks = re.findall(r"```(bash|python)\n(.*?)```", section, flags=re.S)
    assert [lang for lang, _ in blocks] == ["bash", "python"]
    for lang, block in blocks:
        command = ["bash", "-ec"] if lang == "bash" else [sys.executable, "-c"]
        out = subprocess.run([*command, block.replace("http://localhost:3000", server)],
                             capture_output=True, text=True, timeout=60, cwd=ROOT)
        assert out.returncode == 0, out.stderr[-2000:]
        assert "LOC" in out.stdout and '"error"' not in out.stdout, out.stdout[:500]


def test_our_client_and_bentomls_get_the_routes_answers(server):
    import bentoml

    from bentoformers import Client

    long_text = "We meet in Lisbon on Tuesday. " * 40
    direct = httpx.post(f"{server}/ner", json={"inputs": [TEXT, long_text], "model": "ner"}, timeout=60).json()
    assert direct["windows"][0] == 1 and direct["windows"][1] > 1
    with Client(server) as client:
        ours = client.ner([TEXT, long_text], model="ner")
    assert ours.model_dump(exclude_none=True, exclude={"server_timing"}) == direct
    assert ours.server_timing["total"] > 0
    with bentoml.SyncHTTPClient(server) as client:
        theirs = client.ner(inputs=TEXT, aggregation_strategy="first")
    assert theirs == httpx.post(f"{server}/ner", json={"inputs": TEXT, "aggregation_strategy": "first"}).json()
    assert [e["word"] for e in theirs["results"][0]][:3] == ["monday", "3", "paris"]


def test_concurrent_requests_get_the_answers_they_get_alone(server, sentences):
    texts = [TEXT, "We fly to japan in december.", "We meet in Lisbon on Tuesday. " * 30, *sentences[:21]]

    def entities(text):
        r = httpx.post(f"{server}/ner", json={"inputs": text, "aggregation_strategy": "average"}, timeout=60)
        assert r.status_code == 200, r.text
        return r.json()["results"][0]

    alone = [entities(t) for t in texts]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        together = list(pool.map(entities, texts))
    assert together == alone
