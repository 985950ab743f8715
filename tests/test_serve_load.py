"""`dmdd serve` under load: concurrent clients post real images for a bounded time against a server on 127.0.0.1;
every request succeeds and the memory stays flat. Latency and throughput are measured by
benchmarks/serve_load.py (results.md), not asserted here."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from conftest import SHARED_DATA, tiny_config

from dmdd.engine import fit
from dmdd.serve import ServeSettings, create_app

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from browse_serve import live_server  # noqa: E402
from serve_load import rss_mib, run_load  # noqa: E402


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads resident memory from Linux /proc")
def test_concurrent_clients_get_answers_without_errors_and_memory_stays_flat(tiny_tree, tmp_path):
    ckpt = fit(tiny_config(tiny_tree), tmp_path / "run", progress=False)
    tire = sorted((SHARED_DATA / "tire" / "test").rglob("*.png"))[:12]  # real images when the shared data is here
    files = tire or sorted((tiny_tree / "test").rglob("*.png"))
    payloads = [(f.name, f.read_bytes()) for f in files]
    with live_server(create_app(ServeSettings(models=[ckpt], device="cpu"))) as url:
        warm = run_load(url, payloads, clients=4, seconds=3)
        before = rss_mib(os.getpid())
        load = run_load(url, payloads, clients=4, seconds=8)
        after = rss_mib(os.getpid())
    assert warm["errors"] == 0 and load["errors"] == 0, load["first_errors"]
    assert load["requests"] >= 8  # every client got answers, not one request each
    assert after - before < 64, (before, after)  # MiB: no growth with the number of requests
