"""`dmdd serve` under load against a server on 127.0.0.1.

In `make test`: concurrent clients each post a fixed number of images, and every request gets the answer the
server gives a lone request for that image. Opt-in (``benchmark`` marker, DMDD_BENCH=1): a time-bounded load whose
request count and memory growth depend on the machine; latency and throughput are measured by
benchmarks/serve_load.py (results.md), not asserted here."""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path

import pytest
from conftest import SHARED_DATA, tiny_config

from dmdd.deploy.serve import ServeSettings, create_app
from dmdd.training.loop import fit

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from browse_serve import live_server  # noqa: E402


@pytest.fixture(scope="module")
def checkpoint(tiny_tree, tmp_path_factory) -> Path:
    return fit(tiny_config(tiny_tree), tmp_path_factory.mktemp("load") / "run", progress=False)


def payloads(tiny_tree: Path) -> list[tuple[str, bytes]]:
    tire = sorted((SHARED_DATA / "tire" / "test").rglob("*.png"))[:12]  # real images when the shared data is here
    files = tire or sorted((tiny_tree / "test").rglob("*.png"))
    return [(f.name, f.read_bytes()) for f in files]


def test_concurrent_clients_each_get_every_answer_right(checkpoint, tiny_tree):
    import httpx2 as httpx

    images = payloads(tiny_tree)
    clients, per_client = 4, 6
    answers: dict[tuple[int, int], tuple[int, str, float] | str] = {}
    lock = threading.Lock()
    start = threading.Barrier(clients)

    with live_server(create_app(ServeSettings(models=[checkpoint], device="cpu"))) as url:
        with httpx.Client(base_url=url, timeout=120) as http:  # one request at a time: the expected answers
            alone = [http.post("/predict", files={"files": (name, data)}).json()["results"][0]["score"]
                     for name, data in images]  # fmt: skip

        def client(k: int) -> None:
            with httpx.Client(base_url=url, timeout=120) as http:
                start.wait()  # all clients post at once
                for i in range(per_client):
                    name, data = images[(k * per_client + i) % len(images)]
                    try:
                        r = http.post("/predict", files={"files": (name, data)})
                        (row,) = r.json()["results"]
                        answer = (r.status_code, row["name"], row["score"])
                    except Exception as exc:  # noqa: BLE001 - reported below
                        answer = f"{type(exc).__name__}: {exc}"
                    with lock:
                        answers[(k, i)] = answer

        threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
    assert len(answers) == clients * per_client  # every request answered
    assert len(set(alone)) > 1  # the images differ, so a mixed-up answer would show
    for (k, i), answer in sorted(answers.items()):
        index = (k * per_client + i) % len(images)
        assert not isinstance(answer, str), answer
        status, name, score = answer
        # the same image scores the same under load (the model runs one request's batch at a time either way)
        assert status == 200 and name == images[index][0] and score == pytest.approx(alone[index], abs=1e-5), answer


@pytest.mark.benchmark
@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads resident memory from Linux /proc")
def test_time_bounded_load_gets_answers_without_errors_and_memory_stays_flat(checkpoint, tiny_tree):
    from serve_load import rss_mib, run_load

    with live_server(create_app(ServeSettings(models=[checkpoint], device="cpu"))) as url:
        warm = run_load(url, payloads(tiny_tree), clients=4, seconds=3)
        before = rss_mib(os.getpid())
        load = run_load(url, payloads(tiny_tree), clients=4, seconds=8)
        after = rss_mib(os.getpid())
    assert warm["errors"] == 0 and load["errors"] == 0, load["first_errors"]
    assert load["requests"] >= 8  # every client got answers, not one request each
    assert after - before < 64, (before, after)  # MiB: no growth with the number of requests
