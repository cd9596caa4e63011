"""Servers on loopback for the HTTP tests: an app served by uvicorn in a thread of this process
(`running_server`), `fastcomer serve` as a process of its own (`serve_process`), and a client."""
import contextlib
import http.client
import json
import os
import re
import subprocess
import sys
import threading
import time
import uuid

from support.paths import REPO

HOST = "127.0.0.1"


def request(port: int, method: str, path: str, body: bytes = b"", headers=None, timeout: float = 120):
    """(status, JSON or text body, headers) of one HTTP request to the server on loopback."""
    connection = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        data = response.read()
        kind = response.getheader("content-type", "")
        return response.status, json.loads(data) if kind.startswith("application/json") else data.decode(), dict(
            response.getheaders())
    finally:
        connection.close()


def post_image(port: int, data: bytes, query: str = "", content_type: str = "image/png", timeout: float = 120):
    return request(port, "POST", "/v1/recognize" + query, data, {"Content-Type": content_type}, timeout)


def multipart(parts):
    """(body, content type) of multipart/form-data with parts (name, filename or None, content type, bytes)."""
    boundary = uuid.uuid4().hex
    chunks = []
    for name, filename, kind, data in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        chunks.append(f"--{boundary}\r\nContent-Disposition: {disposition}\r\nContent-Type: {kind}\r\n\r\n".encode()
                      + data + b"\r\n")
    return b"".join(chunks) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def wait_ready(port: int, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            if request(port, "GET", "/readyz", timeout=5)[0] == 200:
                return
        time.sleep(0.2)
    raise TimeoutError("the server did not get ready")


@contextlib.contextmanager
def running_server(settings):
    """`fastcomer.serving.app.create_app(settings)` served by uvicorn on a free loopback port, in a
    thread; yields the port once /readyz answers 200."""
    import uvicorn

    from fastcomer.serving.app import create_app

    config = uvicorn.Config(create_app(settings), host=HOST, port=0, log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        wait_ready(port)
        yield port
    finally:
        server.should_exit = True
        thread.join(60)


@contextlib.contextmanager
def serve_process(*arguments):
    """`python -m fastcomer serve ARGUMENTS --port 0` as a process; yields (process, port) once ready."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    process = subprocess.Popen([sys.executable, "-m", "fastcomer", "serve", *arguments, "--port", "0",
                                "--log-level", "warning"], cwd=REPO, env=env, stderr=subprocess.PIPE, text=True)
    try:
        line = process.stderr.readline()
        found = re.search(r"http://[\d.]+:(\d+)", line)
        assert found, line + process.stderr.read() if process.poll() is not None else line
        port = int(found.group(1))
        wait_ready(port)
        yield process, port
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(60)
        process.stderr.close()
