"""Serving benchmark on loopback: throughput and latency of `lungxray serve`, ONNX Runtime vs PyTorch.

Trains the default CNN on the shared dataset once (registered defaults, into bench/out/serve)
unless that bundle exists, exports model.onnx, then:
  1. in-process predictions/s of one image at a time and of batches of 64, ONNX Runtime vs eager PyTorch;
  2. for each backend, starts `lungxray serve` on 127.0.0.1 and sends POST /predict with real X-rays
     from 1, 8 and 32 concurrent clients: a bounded number of requests per level, each level
     bounded in time; reports requests/s, p50 and p99 latency, and errors.
Prints a table and writes BENCHMARKS.md unless --no-write.

    .venv/bin/python bench/serve_bench.py [DATA] [--requests 320]
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
from _report import machine, update_section  # noqa: E402

LUNGXRAY = ROOT / ".venv" / "bin" / "lungxray"


def bundle(data: Path, out: Path) -> Path:
    if not (out / "model" / "config.json").is_file():
        subprocess.run(
            [str(LUNGXRAY), "train", str(data), "--params", "defaults", "--out", str(out), "--force", "--quiet"],
            check=True,
            stdout=subprocess.DEVNULL,
        )
    if not (out / "model" / "model.onnx").is_file():
        subprocess.run([str(LUNGXRAY), "export", str(out / "model"), "--onnx"], check=True, stdout=subprocess.DEVNULL)
    return out / "model"


def in_process(model_dir: Path, images: np.ndarray) -> dict:
    """Predictions/s of each backend, one image per call and 64 per call (median of 3 runs)."""
    from lungxray.predictor import Predictor

    rates = {}
    for backend in ("torch", "onnx"):
        p = Predictor(model_dir, backend=backend)
        p.predict_arrays(images[:8])  # warm-up
        for batch in (1, 64):
            runs = []
            for _ in range(3):
                start, n = time.perf_counter(), 0
                while n < 256:
                    p.predict_arrays(
                        images[n % len(images) : n % len(images) + batch] if batch == 1 else images[:batch]
                    )
                    n += batch
                runs.append(n / (time.perf_counter() - start))
            rates[(backend, batch)] = float(np.median(runs))
    return rates


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def load(url: str, payloads: list[bytes], clients: int, requests: int, limit_s: float) -> dict:
    """``requests`` POSTs from ``clients`` concurrent clients, stopping early after ``limit_s``."""
    import httpx

    latencies, errors, sent = [], 0, 0
    deadline = time.perf_counter() + limit_s

    async def client(http: httpx.AsyncClient, k: int) -> None:
        nonlocal errors, sent
        while sent < requests and time.perf_counter() < deadline:
            body = payloads[(sent + k) % len(payloads)]
            sent += 1
            start = time.perf_counter()
            answer = await http.post(url, files={"file": ("xray.jpg", body, "image/jpeg")})
            latencies.append(time.perf_counter() - start)
            errors += answer.status_code != 200

    async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=clients)) as http:
        start = time.perf_counter()
        await asyncio.gather(*(client(http, k) for k in range(clients)))
        wall = time.perf_counter() - start
    ms = np.array(latencies) * 1000
    return {
        "requests": len(latencies),
        "errors": errors,
        "per_s": len(latencies) / wall,
        "p50_ms": float(np.percentile(ms, 50)),
        "p99_ms": float(np.percentile(ms, 99)),
    }


def serve_and_load(model_dir: Path, backend: str, payloads: list[bytes], requests: int) -> dict:
    import httpx

    port = free_port()
    server = subprocess.Popen(
        [str(LUNGXRAY), "serve", str(model_dir), "--port", str(port), "--backend", backend],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(300):
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        url = f"http://127.0.0.1:{port}/predict"
        asyncio.run(load(url, payloads, 4, 32, 30))  # warm-up
        return {clients: asyncio.run(load(url, payloads, clients, requests, 60)) for clients in (1, 8, 32)}
    finally:
        server.terminate()
        server.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "data", nargs="?", type=Path, default=Path(__file__).resolve().parents[2] / "shared/data/covid19-image-dataset"
    )
    parser.add_argument("--requests", type=int, default=320, help="requests per concurrency level")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "serve")
    parser.add_argument("--no-write", action="store_true", help="print only, leave BENCHMARKS.md alone")
    args = parser.parse_args()
    model_dir = bundle(args.data, args.out)
    files = sorted(p for p in (args.data / "test").rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))[:32]
    from lungxray.decode import decode
    from lungxray.predictor import Predictor

    prep = Predictor(model_dir).preprocessing_
    rates = in_process(model_dir, np.stack([decode(f.read_bytes(), prep) for f in files]))
    payloads = [f.read_bytes() for f in files]
    served = {backend: serve_and_load(model_dir, backend, payloads, args.requests) for backend in ("onnx", "torch")}
    command = f"`.venv/bin/python bench/serve_bench.py {args.data} --requests {args.requests}`"
    lines = [
        "## Serving: `lungxray serve` on loopback, ONNX Runtime vs PyTorch eager",
        "",
        f"Command: {command} ({machine()}). The default CNN (registered defaults, trained by the bench), "
        f"{len(files)} real X-rays from the test/ folder sent as JPEG uploads (decoding and preprocessing "
        f"included), {args.requests} requests per level, each level capped at 60 s.",
        "",
        "| in-process predictions/s | PyTorch eager | ONNX Runtime | ONNX Runtime / eager |",
        "|---|---|---|---|",
    ]
    for batch in (1, 64):
        t, o = rates[("torch", batch)], rates[("onnx", batch)]
        lines.append(f"| {batch} image{'s' if batch > 1 else ''} per call | {t:,.0f} | {o:,.0f} | {o / t:.2f}x |")
    lines += [
        "",
        "| server backend | clients | requests | errors | requests/s | p50 ms | p99 ms |",
        "|---|---|---|---|---|---|---|",
    ]
    for backend, levels in served.items():
        for clients, r in levels.items():
            lines.append(
                f"| {backend} | {clients} | {r['requests']} | {r['errors']} | {r['per_s']:.1f} | "
                f"{r['p50_ms']:.1f} | {r['p99_ms']:.1f} |"
            )
    body = "\n".join(lines)
    print(body)
    if not args.no_write:
        update_section("serve", body)


if __name__ == "__main__":
    main()
