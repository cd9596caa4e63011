"""Load test of `fastcomer serve` (in-flight batching) against the server a user writes today (the
same ASGI stack, each request decoded alone by `fastcomer.recognize`: `fastcomer serve
--no-batching`), on loopback only, with closed-loop clients at each concurrency; then a bounded
soak of the batching server with faults (clients that disconnect mid-request, malformed and
oversize bodies, a SIGTERM under load) that checks nothing is lost or wrong.

Every loop is bounded by a count and a time and the script stops by itself. The model is the
published configuration with seeded random weights (`fastcomer.benchmarking.bench_model`), the
images random pixels (the searches run to max_len, as in `fastcomer bench`). Both servers must
give identical answers for every image. Rows: seconds per image of each server (1 /
throughput) and latency percentiles; `fastcomer.benchmarking`'s schema.

    python benchmarks/bench_serve.py --out benchmarks/results/serve-cpu-2workers.json   # quiet machine: ~20 min
    python benchmarks/bench_serve.py --smoke --out /tmp/serve.json                      # check: ~1 min
    python -m pytest benchmarks/bench_serve.py --smoke                                  # the same, in the suite
"""
import argparse
import contextlib
import http.client
import io
import json
import os
import random
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from fastcomer import CoMER, recognize
from fastcomer.benchmarking import bench_model, make_row, new_report, render_table, scale_weights, write_report
from fastcomer.shapes import BEAM_SIZE, QUICK_IMAGE_SHAPES, QUICK_MAX_LEN

ROOT = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"  # loopback only


@dataclass
class LoadSettings:
    """One run's workload and bounds."""

    shape: Tuple[int, int] = QUICK_IMAGE_SHAPES[0]
    beam_size: int = BEAM_SIZE
    max_len: int = QUICK_MAX_LEN
    workers: int = 2
    concurrency: Sequence[int] = (1, 4, 8, 16)
    requests: int = 48  # per level at most (at least 2 per client)
    level_seconds: float = 300.0  # per level at most
    images: int = 8  # distinct images, sent in turn
    soak_requests: int = 200
    soak_seconds: float = 300.0
    soak_concurrency: int = 8
    smoke: bool = False

    @classmethod
    def smoke_settings(cls) -> "LoadSettings":
        return cls(shape=(32, 64), beam_size=2, max_len=6, workers=1, concurrency=(1, 2), requests=4,
                   level_seconds=60.0, images=3, soak_requests=24, soak_seconds=60.0, soak_concurrency=3, smoke=True)


def model_for(settings: LoadSettings) -> CoMER:
    if not settings.smoke:
        return bench_model(0)
    torch.manual_seed(0)  # a small CoMER: the smoke run checks the machinery, not the speed
    small = CoMER(d_model=32, growth_rate=4, num_layers=1, nhead=4, num_decoder_layers=2, dim_feedforward=64, dc=8)
    return scale_weights(small, 0, end_bias=1.0, end_scale=4.0)


def png_images(settings: LoadSettings) -> List[bytes]:
    rng = np.random.RandomState(0)
    images = []
    for _ in range(settings.images):
        out = io.BytesIO()
        from PIL import Image

        Image.fromarray((rng.rand(*settings.shape) * 255).astype(np.uint8)).save(out, format="PNG")
        images.append(out.getvalue())
    return images


# --- servers and clients -------------------------------------------------------------------------

@contextlib.contextmanager
def server(checkpoint: Path, settings: LoadSettings, *extra: str):
    """`fastcomer serve` on a free loopback port; yields (process, port) once every worker is ready."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "fastcomer", "serve", "--checkpoint", str(checkpoint), "--host", HOST, "--port", "0",
               "--workers", str(settings.workers), "--max-len", str(settings.max_len),
               "--max-beam-size", str(settings.beam_size), "--max-batch", str(max(settings.concurrency)),
               "--max-queue", "256", "--timeout-s", "600", "--log-level", "warning", *extra]
    process = subprocess.Popen(command, cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    try:
        line = process.stderr.readline()
        found = re.search(r"http://[\d.]+:(\d+)", line)
        if not found:
            raise RuntimeError(f"the server did not start: {line}{process.stderr.read()}")
        port = int(found.group(1))
        threading.Thread(target=process.stderr.read, daemon=True).start()  # drained, never blocks it
        deadline = time.monotonic() + 600
        ready_pids = set()
        while len(ready_pids) < settings.workers:  # each worker answers /readyz once its model is warm
            if time.monotonic() > deadline or process.poll() is not None:
                raise RuntimeError("the server's workers did not get ready")
            with contextlib.suppress(OSError, ValueError):
                status, body = call(port, "GET", "/readyz", timeout=10)
                if status == 200:
                    ready_pids.add(body["pid"])
            time.sleep(0.1)
        yield process, port
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(120)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def call(port: int, method: str, path: str, body: bytes = b"", content_type: str = "image/png",
         timeout: float = 600) -> Tuple[int, object]:
    """(status, JSON body) of one request on a fresh connection (as independent clients make them)."""
    connection = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        headers = {"Content-Type": content_type} if body else {}
        connection.request(method, path, body=body, headers=headers)
        response = connection.getresponse()
        return response.status, json.loads(response.read() or b"null")
    finally:
        connection.close()


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


@dataclass
class Level:
    concurrency: int
    latencies: List[float] = field(default_factory=list)
    answers: Dict[int, List[int]] = field(default_factory=dict)  # image index -> tokens
    scores: Dict[int, float] = field(default_factory=dict)
    failures: List[str] = field(default_factory=list)
    wall_s: float = 0.0

    @property
    def throughput(self) -> float:
        return len(self.latencies) / self.wall_s


def drive(port: int, images: List[bytes], settings: LoadSettings, concurrency: int) -> Level:
    """Closed-loop clients: each sends its next request when the last is answered, until the level's
    request count or time is reached."""
    level = Level(concurrency)
    query = f"/v1/recognize?beam_size={settings.beam_size}&max_len={settings.max_len}"
    total = max(settings.requests, 2 * concurrency)
    counter = iter(range(total))
    lock = threading.Lock()
    stop_at = time.monotonic() + settings.level_seconds

    def client():
        while time.monotonic() < stop_at:
            with lock:
                n = next(counter, None)
            if n is None:
                return
            image = n % len(images)
            started = time.perf_counter()
            try:
                status, body = call(port, "POST", query, images[image])
            except OSError as err:
                status, body = None, str(err)
            with lock:
                if status != 200:
                    level.failures.append(f"{status}: {body}")
                    continue
                level.latencies.append(time.perf_counter() - started)
                if level.answers.setdefault(image, body["tokens"]) != body["tokens"]:
                    level.failures.append(f"image {image}: two different answers")
                level.scores[image] = body["score"]

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    level.wall_s = time.perf_counter() - started
    return level


def direct_latency(model: CoMER, images: List[bytes], settings: LoadSettings, calls: int) -> float:
    """Median seconds of a direct `fastcomer.recognize` call of one image (1 thread, this process)."""
    from PIL import Image

    torch.set_num_threads(1)
    times = []
    for n in range(calls + 1):
        image = Image.open(io.BytesIO(images[n % len(images)]))
        started = time.perf_counter()
        recognize(model, [image], beam_size=settings.beam_size, max_len=settings.max_len)
        times.append(time.perf_counter() - started)
    return statistics.median(times[1:])  # the first warms up


# --- the soak with faults ------------------------------------------------------------------------

@dataclass
class Soak:
    sent: Dict[str, int] = field(default_factory=dict)  # by kind
    statuses: Dict[str, int] = field(default_factory=dict)
    lost: List[str] = field(default_factory=list)  # sent before SIGTERM, no answer
    wrong: List[str] = field(default_factory=list)  # an answer other than expected
    refused_after_sigterm: int = 0
    exit_code: Optional[int] = None
    wall_s: float = 0.0


def disconnect_midway(port: int, body: bytes, query: str) -> None:
    """Send a whole request, then close the connection before the answer."""
    with socket.create_connection((HOST, port), timeout=30) as sock:
        head = (f"POST {query} HTTP/1.1\r\nHost: {HOST}\r\nContent-Type: image/png\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode()
        sock.sendall(head + body)
        time.sleep(0.05)


def soak(process: subprocess.Popen, port: int, images: List[bytes], expected: Dict[int, List[int]],
         settings: LoadSettings, max_bytes: int) -> Soak:
    """Requests of every kind from soak_concurrency clients; SIGTERM once 80% were sent; checks that every
    request sent before it was answered as expected, and that the server exited cleanly."""
    result = Soak()
    query = f"/v1/recognize?beam_size={settings.beam_size}&max_len={settings.max_len}"
    kinds = ["ok"] * 7 + ["disconnect", "malformed", "oversize"]
    rng = random.Random(0)
    plan = [rng.choice(kinds) for _ in range(settings.soak_requests)]
    counter = iter(range(len(plan)))
    lock = threading.Lock()
    terminated = threading.Event()
    stop_at = time.monotonic() + settings.soak_seconds
    oversize = b"\x89PNG" + b"\0" * max_bytes

    def client():
        while time.monotonic() < stop_at:
            with lock:
                n = next(counter, None)
                if n is not None and n >= 0.8 * len(plan) and not terminated.is_set():
                    terminated.set()
                    process.send_signal(signal.SIGTERM)  # under load: the others are in flight
            if n is None:
                return
            kind, image = plan[n], n % len(images)
            after_sigterm = terminated.is_set()
            with lock:
                result.sent[kind] = result.sent.get(kind, 0) + 1
            try:
                if kind == "disconnect":
                    disconnect_midway(port, images[image], query)
                    continue
                body = {"ok": images[image], "malformed": b"not an image", "oversize": oversize}[kind]
                status, answer = call(port, "POST", query, body, timeout=600)
            except OSError as err:
                with lock:
                    if after_sigterm:
                        result.refused_after_sigterm += 1
                    else:
                        result.lost.append(f"request {n} ({kind}): {err}")
                continue
            want = {"ok": 200, "malformed": 400, "oversize": 413}[kind]
            with lock:
                result.statuses[str(status)] = result.statuses.get(str(status), 0) + 1
                if status != want or (kind == "ok" and answer["tokens"] != expected[image]):
                    result.wrong.append(f"request {n} ({kind}): {status} {answer}")

    threads = [threading.Thread(target=client) for _ in range(settings.soak_concurrency)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if not terminated.is_set():
        process.send_signal(signal.SIGTERM)
    result.exit_code = process.wait(600)
    result.wall_s = time.perf_counter() - started
    return result


# --- the run ---------------------------------------------------------------------------------------

def run(settings: LoadSettings, log=print) -> List[dict]:
    """The rows of one run (the report's)."""
    model = model_for(settings)
    images = png_images(settings)
    max_bytes = 2 * max(len(image) for image in images) + 1024
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as folder:
        checkpoint = Path(folder) / "model.pt"
        torch.save(model.state_dict(), checkpoint)
        levels: Dict[str, Dict[int, Level]] = {}
        for variant, extra in (("per-request", ["--no-batching"]), ("in-flight", [])):
            with server(checkpoint, settings, *extra, "--max-bytes", str(max_bytes)) as (process, port):
                levels[variant] = {}
                for concurrency in settings.concurrency:
                    level = drive(port, images, settings, concurrency)
                    levels[variant][concurrency] = level
                    log(f"{variant} concurrency {concurrency}: {level.throughput:.3f} images/s, "
                        f"p50 {percentile(level.latencies, 50):.3f} s, {len(level.failures)} failures")
                if variant == "in-flight":
                    expected = levels["per-request"][settings.concurrency[0]].answers
                    outcome = soak(process, port, images, expected, settings, max_bytes)
                    log(f"soak: sent {outcome.sent}, statuses {outcome.statuses}, lost {len(outcome.lost)}, "
                        f"wrong {len(outcome.wrong)}, exit {outcome.exit_code}")
        direct_p50 = direct_latency(model, images, settings, calls=3 if settings.smoke else 8)
    params = {"shape": list(settings.shape), "beam_size": settings.beam_size, "max_len": settings.max_len,
              "workers": settings.workers, "requests": settings.requests, "images": settings.images,
              "model": "small random CoMER" if settings.smoke else "CoMER() published config, seeded random weights"}
    reference = levels["per-request"]
    for concurrency in settings.concurrency:
        ours, theirs = levels["in-flight"][concurrency], reference[concurrency]
        identical = not ours.failures and not theirs.failures and all(
            ours.answers.get(i) == theirs.answers.get(i) for i in set(ours.answers) | set(theirs.answers))
        details = {f"{name}_{key}": value for name, level in (("in_flight", ours), ("per_request", theirs))
                   for key, value in (("images_per_s", level.throughput), ("requests", len(level.latencies)),
                                      ("p50_s", percentile(level.latencies, 50)),
                                      ("p95_s", percentile(level.latencies, 95)),
                                      ("p99_s", percentile(level.latencies, 99)), ("failures", level.failures[:5]))}
        details["max_score_difference"] = max((abs(ours.scores[i] - theirs.scores[i]) for i in ours.scores
                                               if i in theirs.scores), default=0.0)
        if concurrency == 1:
            details["direct_recognize_p50_s"] = direct_p50
            details["p50_over_direct"] = percentile(ours.latencies, 50) / direct_p50
        rows.append(make_row("serve", f"concurrency={concurrency}", {**params, "concurrency": concurrency},
                             "in-flight", {"in-flight": 1 / ours.throughput, "per-request": 1 / theirs.throughput},
                             checks={"identical": identical}, details=details))
    rows.append(make_row("serve_soak", "faults", {**params, "requests": settings.soak_requests,
                                                   "concurrency": settings.soak_concurrency},
                         "in-flight", {"in-flight": outcome.wall_s / max(1, sum(outcome.sent.values()))},
                         checks={"lost": len(outcome.lost), "wrong": len(outcome.wrong),
                                 "clean_exit": outcome.exit_code == 0},
                         details={"sent": outcome.sent, "statuses": outcome.statuses, "lost": outcome.lost[:5],
                                  "wrong": outcome.wrong[:5], "refused_after_sigterm": outcome.refused_after_sigterm}))
    return rows


def test_serve(smoke, benchmark, record):
    """The suite's entry (`python -m pytest benchmarks/bench_serve.py [--smoke]`): the whole load
    test is one pytest-benchmark round; its rows are timed by `run`."""
    rows = benchmark.pedantic(run, args=(LoadSettings.smoke_settings() if smoke else LoadSettings(),),
                              kwargs=dict(log=lambda line: None), rounds=1)
    record.rows(rows)
    assert all(row["checks"]["identical"] for row in rows if row["benchmark"] == "serve")
    soaked = rows[-1]["checks"]
    assert soaked == {"lost": 0, "wrong": 0, "clean_exit": True}, rows[-1]["details"]


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny model and counts: checks that the load test runs")
    parser.add_argument("--out", type=Path, help="write the report (JSON) to this file or into this folder")
    parser.add_argument("--workers", type=int, help="worker processes of each server (default: 2, smoke 1)")
    parser.add_argument("--concurrency", type=lambda text: tuple(int(c) for c in text.split(",")),
                        help="comma-separated client counts (default: 1,4,8,16)")
    parser.add_argument("--requests", type=int, help="requests per level at most (default: 48)")
    args = parser.parse_args(argv)
    settings = LoadSettings.smoke_settings() if args.smoke else LoadSettings()
    for name in ("workers", "concurrency", "requests"):
        if getattr(args, name) is not None:
            setattr(settings, name, getattr(args, name))
    torch.set_num_threads(1)  # as each server worker (and the direct recognize timed here) runs
    report = new_report(torch.device("cpu"))
    report["rows"] = run(settings, log=lambda line: print(line, file=sys.stderr, flush=True))
    path = write_report(report, args.out)
    print(render_table([(str(path or "not written"), report)]))
    print(json.dumps([{"name": row["name"], "checks": row["checks"], "speedup": row["speedups"]}
                      for row in report["rows"]]))
    return 0 if all(row["checks"].get("identical", True) for row in report["rows"]) and not report["rows"][-1][
        "checks"]["lost"] and not report["rows"][-1]["checks"]["wrong"] else 1


if __name__ == "__main__":
    sys.exit(main())
