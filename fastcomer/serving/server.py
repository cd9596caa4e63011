"""Running the service: uvicorn's worker processes over one listening socket, each with its
own model and scheduler (`app.app_from_environment`), under uvicorn's supervisor, which
restarts a worker that dies. SIGTERM (or SIGINT) drains: the socket closes, so no new
connection is taken, every worker answers the requests it has, then exits."""
import os
import shutil
import sys
import tempfile

import uvicorn
from uvicorn.supervisors import Multiprocess

from .settings import ServeSettings


class Supervisor(Multiprocess):
    """uvicorn's supervisor (one process per worker, restarted when it dies), for any number of
    workers, that also closes its copy of the listening socket when told to stop: once the
    workers close theirs, new connections are refused at once rather than left waiting."""

    def handle_term(self) -> None:
        for sock in self.sockets:
            sock.close()
        super().handle_term()

    def handle_int(self) -> None:
        for sock in self.sockets:
            sock.close()
        super().handle_int()


def serve(settings: ServeSettings, host: str, port: int, workers: int, log_level: str = "info") -> int:
    """Serve until SIGTERM or SIGINT; the exit status."""
    settings.to_environment()  # the spawned workers read it
    metrics_dir = tempfile.mkdtemp(prefix="fastcomer-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir  # before any worker imports prometheus_client
    try:
        config = uvicorn.Config("fastcomer.serving.app:app_from_environment", factory=True, host=host, port=port,
                                workers=workers, log_level=log_level, lifespan="on",
                                # a drain answers the requests in flight, each at most timeout_s
                                timeout_graceful_shutdown=int(settings.timeout_s) + 5)
        try:
            sock = config.bind_socket()
        except SystemExit:  # uvicorn logged why
            print(f"fastcomer serve: cannot listen on {host}:{port}", file=sys.stderr)
            return 1
        bound_host, bound_port = sock.getsockname()[:2]
        print(f"fastcomer serve: listening on http://{bound_host}:{bound_port} with {workers} worker(s)",
              file=sys.stderr, flush=True)
        Supervisor(config, sockets=[sock]).run()
        return 0
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)
