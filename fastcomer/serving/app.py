"""The HTTP service of `fastcomer serve`: a Starlette app over one model and one Scheduler
per worker process (docs/serve.md).

    POST /v1/recognize   an image as the raw body, or images as multipart/form-data;
                         ?beam_size=&max_len= -> {"latex", "tokens", "score"} (a list for multipart)
    GET  /healthz        the worker is alive (while the model loads too)
    GET  /readyz         the model is loaded and warmed up
    GET  /metrics        Prometheus' text format

Bad input is a 4xx with {"error": message}: 400 an image that cannot be decoded or prepared,
413 too many bytes, pixels or images, 415 an unsupported Content-Type, 422 bad parameters;
503 (with Retry-After) while loading or when the queue is full; 504 past --timeout-s.
"""
import asyncio
import os
import signal
import threading
import time
from contextlib import asynccontextmanager
from typing import Any, List, Optional

import torch
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ..allocator import keep_freed_memory
from ..checkpoint import load_comer
from ..recognize import prepare_image, recognize
from ..search.hypotheses import Hypothesis
from ..search.threads import search_threads
from ..vocab import vocab
from . import metrics
from .inputs import Problem, image_bodies, open_image, search_settings
from .scheduler import QueueFull, Scheduler, SchedulerClosed
from .settings import ServeSettings

RETRY_AFTER = {"Retry-After": "1"}


class Service:
    """One worker's model and scheduler, loaded in a thread of its own (`status`: loading,
    ready, or failed: why), so that /healthz answers meanwhile."""

    def __init__(self, settings: ServeSettings):
        self.settings = settings
        self.status = "loading"
        self.model: Optional[torch.nn.Module] = None
        self.scheduler: Optional[Scheduler] = None
        self._restarting = False

    def load(self) -> None:
        settings = self.settings
        try:
            keep_freed_memory()  # a worker is fastcomer's own process (fastcomer.allocator)
            torch.set_num_threads(search_threads(None))  # the engine's policy: 1 intra-op thread per worker
            self.model = load_comer(settings.checkpoint, map_location=settings.device)
            warm_up = torch.zeros(1, 32, 32)
            if settings.batching:
                self.scheduler = Scheduler(self.model, max_images=settings.max_batch, max_queue=settings.max_queue,
                                           backend=settings.backend, graphs=settings.graphs, on_step=self._on_step)
                self.scheduler.submit(warm_up, beam_size=1, max_len=2).result()
            else:
                recognize(self.model, [warm_up], beam_size=1, max_len=2)
            self.status = "ready"
        except Exception as err:  # noqa: BLE001 - reported by /readyz and every request
            self.status = f"failed: {err}"

    def _on_step(self, rows: int, seconds: float) -> None:
        metrics.observe_step(rows, seconds)
        metrics.QUEUE.set(self.scheduler.queued())
        metrics.RUNNING.set(self.scheduler.running())

    def close(self) -> None:
        if self.scheduler is not None:
            self.scheduler.close()
        metrics.process_exits()

    async def recognize(self, request: Request, arrived: float) -> Any:
        settings = self.settings
        if self.status != "ready":
            raise Problem(503, f"the model is {self.status}", RETRY_AFTER)
        beam_size, max_len = search_settings(request.query_params, settings)
        bodies, several = await image_bodies(request, settings)
        if len(bodies) > settings.max_images:
            raise Problem(413, f"{len(bodies)} images, more than the server's limit of {settings.max_images} per request")
        if settings.batching:
            images = await run_in_threadpool(self._prepare, bodies)
            hyps = await self._decode(request, images, beam_size, max_len, arrived)
        else:
            hyps = await run_in_threadpool(self._recognize_alone, bodies, beam_size, max_len)
        answers = [{"latex": vocab.indices2label(hyp.seq), "tokens": hyp.seq, "score": hyp.score} for hyp in hyps]
        return answers if several else answers[0]

    def _prepare(self, bodies: List[bytes]) -> List[torch.Tensor]:
        images = []
        for i, data in enumerate(bodies):
            image = open_image(data, i, self.settings.max_pixels)
            try:
                images.append(prepare_image(image, max_pixels=self.settings.max_pixels))
            except (ValueError, TypeError, OSError) as err:
                raise Problem(400, f"image {i}: {err}") from None
        return images

    def _recognize_alone(self, bodies: List[bytes], beam_size: int, max_len: int) -> List[Hypothesis]:
        """The server a user writes today: fastcomer.recognize per request."""
        images = [open_image(data, i, self.settings.max_pixels) for i, data in enumerate(bodies)]
        results = recognize(self.model, images, beam_size=beam_size, max_len=max_len, details=True,
                            max_pixels=self.settings.max_pixels)
        for i, result in enumerate(results):
            if result.error is not None:
                raise Problem(400, f"image {i}: {result.error}")
        return [Hypothesis(result.tokens, result.score) for result in results]

    async def _decode(self, request: Request, images: List[torch.Tensor], beam_size: int, max_len: int,
                      arrived: float) -> List[Hypothesis]:
        submitted = []
        try:
            for image in images:
                submitted.append(self.scheduler.submit(image, beam_size=beam_size, max_len=max_len))
        except (QueueFull, SchedulerClosed) as err:
            for queued in submitted:
                queued.cancel()
            raise Problem(503, f"the server is busy: {err}" if isinstance(err, QueueFull) else str(err),
                          RETRY_AFTER) from None
        answers = asyncio.gather(*(asyncio.wrap_future(r.future) for r in submitted))
        gone = asyncio.ensure_future(_disconnected(request))
        remaining = self.settings.timeout_s - (time.monotonic() - arrived)
        try:
            done, _ = await asyncio.wait({answers, gone}, timeout=max(remaining, 0.0),
                                         return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
        if answers in done:
            try:
                return answers.result()
            except SchedulerClosed as err:  # the decoding thread failed: this worker is restarted
                self._restart()
                raise Problem(500, f"internal error, the worker restarts: {err}") from None
        for queued in submitted:
            queued.cancel()  # frees its slots at the next step boundary
        answers.cancel()
        answers.add_done_callback(lambda f: f.cancelled() or f.exception())  # retrieved: no warning
        if gone in done:
            raise Problem(499, "the client disconnected")  # nobody reads it; counted in the metrics
        raise Problem(504, f"no answer within the server's limit of {self.settings.timeout_s:g} s")

    def _restart(self) -> None:
        """Drain and exit this worker; the supervisor starts a fresh one."""
        if not self._restarting:
            self._restarting = True
            self.status = "failed: the decoding thread failed"
            os.kill(os.getpid(), signal.SIGTERM)


async def _disconnected(request: Request) -> None:
    """Returns when the client goes away (the body was read: what comes next is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def create_app(settings: ServeSettings, load: bool = True) -> Starlette:
    """The app of one worker. load: start loading the model at startup (False: the caller
    calls app.state.service.load() itself)."""
    service = Service(settings)

    async def recognize_endpoint(request: Request) -> Response:
        arrived = time.monotonic()
        try:
            response = JSONResponse(await service.recognize(request, arrived))
        except Problem as problem:
            response = JSONResponse({"error": problem.message}, problem.status, headers=problem.headers)
        metrics.REQUESTS.labels(str(response.status_code)).inc()
        metrics.LATENCY.observe(time.monotonic() - arrived)
        return response

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "alive", "pid": os.getpid()})

    async def readyz(request: Request) -> Response:
        ready = service.status == "ready"
        return JSONResponse({"status": service.status, "pid": os.getpid()}, 200 if ready else 503,
                            headers=None if ready else RETRY_AFTER)

    async def metrics_endpoint(request: Request) -> Response:
        body, content_type = metrics.exposition()
        return Response(body, media_type=content_type)

    async def http_error(request: Request, error: HTTPException) -> Response:
        return JSONResponse({"error": error.detail}, error.status_code, headers=error.headers)

    async def internal_error(request: Request, error: Exception) -> Response:
        return JSONResponse({"error": f"internal error: {type(error).__name__}"}, 500)

    @asynccontextmanager
    async def lifespan(app: Starlette):
        if load:
            threading.Thread(target=service.load, name="fastcomer-load", daemon=True).start()
        yield
        await run_in_threadpool(service.close)  # uvicorn answered every request first: a drain

    app = Starlette(
        routes=[Route("/v1/recognize", recognize_endpoint, methods=["POST"]), Route("/healthz", healthz),
                Route("/readyz", readyz), Route("/metrics", metrics_endpoint)],
        exception_handlers={HTTPException: http_error, Exception: internal_error},
        lifespan=lifespan,
    )
    app.state.service = service
    return app


def app_from_environment() -> Starlette:
    """The app of a worker that `fastcomer serve` spawned (its settings in the environment)."""
    return create_app(ServeSettings.from_environment())
