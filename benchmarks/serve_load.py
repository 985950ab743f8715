"""Load test of `dmdd serve`: concurrent clients post real images to ``POST /predict`` for a bounded time against a
server on 127.0.0.1 (a separate process, started here); reports p50 / p99 latency, throughput, errors and the
server's resident memory after a warm-up and at the end.

Example (results in docs/results.md):
    python benchmarks/serve_load.py runs/tire/last.pt --images ../shared/data/tire/test --clients 4 --seconds 60
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx2 as httpx
import numpy as np


def rss_mib(pid: int) -> float:
    """Resident memory of a process (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def run_load(url: str, payloads: list[tuple[str, bytes]], clients: int, seconds: float) -> dict:
    """``clients`` threads, each posting one image at a time (cycling through ``payloads``) for ``seconds``."""
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    stop_at = time.perf_counter() + seconds

    def client(k: int) -> None:
        with httpx.Client(base_url=url, timeout=120) as http:
            i = k
            while time.perf_counter() < stop_at:
                name, data = payloads[i % len(payloads)]
                start = time.perf_counter()
                try:
                    r = http.post("/predict", files={"files": (name, data)})
                    ok = r.status_code == 200 and len(r.json()["results"]) == 1
                    problem = None if ok else f"{r.status_code}: {r.text[:200]}"
                except httpx.HTTPError as exc:
                    problem = f"{type(exc).__name__}: {exc}"
                with lock:
                    latencies.append(time.perf_counter() - start)
                    if problem:
                        errors.append(problem)
                i += clients

    started = time.perf_counter()
    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    lat = np.asarray(latencies) * 1000
    return {"requests": len(latencies), "errors": len(errors), "first_errors": errors[:3],
            "p50_ms": float(np.percentile(lat, 50)) if lat.size else None,
            "p99_ms": float(np.percentile(lat, 99)) if lat.size else None,
            "throughput_per_s": len(latencies) / wall, "wall_s": wall}  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model")
    p.add_argument("--images", type=Path, required=True, help="folder of images (searched recursively)")
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--seconds", type=float, default=60)
    p.add_argument("--warmup", type=float, default=10)
    p.add_argument("--threads", type=int, default=2, help="torch threads of the server")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    payloads = [(f.name, f.read_bytes()) for f in sorted(args.images.rglob("*.png"))]
    port = free_port()
    cmd = [sys.executable, "-m", "dmdd.cli", "serve", args.model, "--port", str(port), "--threads", str(args.threads),
           "--device", "cpu"]  # fmt: skip
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=os.environ.copy())
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline or server.poll() is not None:
                raise RuntimeError("the server did not start")
            time.sleep(0.5)
        warm = run_load(url, payloads, args.clients, args.warmup)
        rss_start = rss_mib(server.pid)
        result = run_load(url, payloads, args.clients, args.seconds)
        rss_end = rss_mib(server.pid)
    finally:
        server.terminate()
        server.wait(timeout=30)
    result = {"model": args.model, "images": len(payloads), "clients": args.clients, "server_threads": args.threads,
              "warmup_requests": warm["requests"], "warmup_errors": warm["errors"], **result,
              "server_rss_mib_after_warmup": round(rss_start, 1), "server_rss_mib_end": round(rss_end, 1)}  # fmt: skip
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
