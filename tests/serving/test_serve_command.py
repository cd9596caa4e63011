"""`fastcomer serve` as a process: a worker that dies is restarted and its requests fail (they do not
hang); SIGTERM drains (in-flight requests answered once, new connections refused, exit 0); usage
errors exit 2 with one line."""
import io
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from support.paths import REPO

from support.servers import post_image, request, serve_process

PIL = pytest.importorskip("PIL.Image")


def png(height: int, width: int) -> bytes:
    out = io.BytesIO()
    PIL.fromarray((np.random.RandomState(0).rand(height, width) * 255).astype(np.uint8)).save(out, format="PNG")
    return out.getvalue()


def test_worker_restart_and_drain_on_sigterm(checkpoint):
    with serve_process("--checkpoint", str(checkpoint), "--workers", "1", "--max-len", "400") as (process, port):
        # a worker killed during a request: the request fails at once, a new worker takes over
        worker = request(port, "GET", "/healthz")[1]["pid"]
        failed = {}

        def long_request():
            try:
                failed["answer"] = post_image(port, png(128, 512), "?beam_size=10&max_len=400", timeout=60)
            except OSError as err:  # the connection closed without an answer
                failed["error"] = err

        thread = threading.Thread(target=long_request)
        thread.start()
        time.sleep(1.0)
        os.kill(worker, signal.SIGKILL)
        thread.join(60)
        assert "error" in failed, failed
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if request(port, "GET", "/readyz", timeout=5)[0] == 200:
                    break
            except OSError:
                time.sleep(0.2)
        assert request(port, "GET", "/healthz")[1]["pid"] != worker

        # SIGTERM with requests in flight: each is answered, once; then the server is gone
        answers = [None] * 3

        def send(i):
            answers[i] = post_image(port, png(32 + 8 * i, 96), "?beam_size=3&max_len=40", timeout=120)

        threads = [threading.Thread(target=send, args=(i,)) for i in range(3)]
        for thread in threads:
            thread.start()
        time.sleep(0.5)
        process.send_signal(signal.SIGTERM)
        for thread in threads:
            thread.join(120)
        assert [answer[0] for answer in answers] == [200, 200, 200]
        assert process.wait(60) == 0
        with pytest.raises(OSError):
            request(port, "GET", "/healthz", timeout=5)


def test_usage_errors_exit_2_with_one_line():
    done = subprocess.run([sys.executable, "-m", "fastcomer", "serve", "--checkpoint", "missing.pt"], cwd=REPO,
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith("fastcomer serve: error: --checkpoint")
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("arguments, message", [
    (["--port", "70000"], "port number in 0..65535"),
    (["--port", "http"], "expected a port number"),
    (["--timeout-s", "0"], "positive number of seconds"),
    (["--timeout-s", "inf"], "positive number of seconds"),
    (["--max-batch", "0"], "positive integer"),
])
def test_argument_checks(arguments, message, capsys):
    from fastcomer.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "--checkpoint", "x.pt", *arguments])
    assert exit_info.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("fastcomer serve: error:") and message in last


def test_bad_limits_for_the_model_exit_2(checkpoint):
    done = subprocess.run([sys.executable, "-m", "fastcomer", "serve", "--checkpoint", str(checkpoint),
                           "--max-len", "100000"], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 2 and "--max-len must be in 2.." in done.stderr


def test_a_missing_extra_is_one_line_naming_it(monkeypatch, capsys):
    import importlib.util

    from fastcomer.cli import main

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "uvicorn" else real(name, *a))
    assert main(["serve", "--checkpoint", "x.pt"]) == 1
    assert capsys.readouterr().err.strip() == 'fastcomer serve needs uvicorn, not installed: pip install "fastcomer[serve]"'
