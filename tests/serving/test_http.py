"""The HTTP contract of `fastcomer serve`, against real servers on loopback: the answers (those
of `fastcomer.recognize`), every error status with its JSON message, health, readiness and metrics."""
import io
import threading
import time

import numpy as np
import pytest

from fastcomer import load_comer, recognize
from fastcomer.serving.settings import ServeSettings

from support.servers import multipart, post_image, request, running_server

PIL = pytest.importorskip("PIL.Image")


def png(height: int, width: int, seed: int = 0) -> bytes:
    """A PNG of random pixels (seed None: black ones, a few bytes whatever the size)."""
    pixels = np.zeros((height, width), np.uint8) if seed is None else (
        np.random.RandomState(seed).rand(height, width) * 255).astype(np.uint8)
    out = io.BytesIO()
    PIL.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


@pytest.fixture(scope="module")
def server(checkpoint):
    settings = ServeSettings(checkpoint=str(checkpoint), max_beam_size=4, beam_size=2, max_len=12,
                             max_bytes=200_000, max_pixels=600 * 600, max_images=3)
    with running_server(settings) as port:
        yield port


@pytest.fixture(scope="module")
def model(checkpoint):
    return load_comer(checkpoint)


def test_answers_equal_recognize(server, model):
    images = [png(40, 120, 1), png(64, 64, 2), png(30, 300, 3)]
    got = post_image(server, images[0], "?beam_size=3&max_len=10")
    assert got[0] == 200, got
    expected = recognize(model, [PIL.open(io.BytesIO(images[0]))], beam_size=3, max_len=10, details=True)[0]
    assert got[1]["tokens"] == expected.tokens and got[1]["latex"] == expected.latex
    assert got[1]["score"] == pytest.approx(expected.score, rel=1e-5)
    # several images as multipart: a list, in order, each as decoded alone
    body, kind = multipart([(f"image{i}", f"{i}.png", "image/png", data) for i, data in enumerate(images)])
    status, answers, _ = post_image(server, body, "?beam_size=2", content_type=kind)
    assert status == 200 and len(answers) == 3
    for data, answer in zip(images, answers):
        alone = recognize(model, [PIL.open(io.BytesIO(data))], beam_size=2, max_len=12, details=True)[0]
        assert answer["tokens"] == alone.tokens and answer["score"] == pytest.approx(alone.score, rel=1e-5)


def test_concurrent_requests_answer_as_alone(server, model):
    images = [png(16 + 8 * i, 40 + 20 * i, 10 + i) for i in range(6)]
    results = [None] * len(images)

    def send(i):
        results[i] = post_image(server, images[i], f"?beam_size={1 + i % 3}&max_len={6 + i}")

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(images))]
    for thread in threads:
        thread.start()
        time.sleep(0.05)
    for thread in threads:
        thread.join(120)
    for i, (status, answer, _) in enumerate(results):
        alone = recognize(model, [PIL.open(io.BytesIO(images[i]))], beam_size=1 + i % 3, max_len=6 + i,
                          details=True)[0]
        assert status == 200 and answer["tokens"] == alone.tokens


@pytest.mark.parametrize("body, query, content_type, status, message", [
    (b"not an image", "", "image/png", 400, "not an image file"),
    (png(20, 20)[:60], "", "image/png", 400, "image 0"),  # truncated
    (png(16, 2000), "", "image/png", 400, "aspect ratio"),  # outside CoMER's range
    (b"x" * 200_001, "", "image/png", 413, "200000"),
    (png(700, 700, seed=None), "", "image/png", 413, "pixels"),
    (png(20, 20), "", "text/plain", 415, "text/plain"),
    (png(20, 20), "", "", 415, "Content-Type"),
    (png(20, 20), "?beam_size=5", "image/png", 422, "beam_size must be in 1..4"),
    (png(20, 20), "?beam_size=two", "image/png", 422, "beam_size must be an integer"),
    (png(20, 20), "?max_len=1", "image/png", 422, "max_len must be in 2..12"),
    (png(20, 20), "?beam=3", "image/png", 422, "unknown query parameter(s) beam"),
    (b"--x\r\nbroken", "", "multipart/form-data; boundary=x", 400, ""),
], ids=["undecodable", "truncated", "aspect-ratio", "bytes", "pixels", "text", "no-type", "beam-range", "beam-int",
        "max-len", "unknown", "multipart"])
def test_bad_requests_are_4xx_with_a_message(server, body, query, content_type, status, message):
    got = post_image(server, body, query, content_type)
    assert got[0] == status and message in got[1]["error"], got


def test_bad_multipart_requests(server):
    image = png(20, 20)
    body, kind = multipart([(f"i{i}", f"{i}.png", "image/png", image) for i in range(4)])
    assert post_image(server, body, content_type=kind)[0] == 413  # more than max_images
    body, kind = multipart([("i", "a.txt", "text/plain", image)])
    assert post_image(server, body, content_type=kind)[0] == 415
    body, kind = multipart([("field", None, "text/plain", b"value")])
    got = post_image(server, body, content_type=kind)
    assert got[0] == 422 and "form field" in got[1]["error"]
    body, kind = multipart([])
    assert post_image(server, body, content_type=kind)[0] == 400


def test_health_readiness_metrics_and_unknown_paths(server):
    status, body, _ = request(server, "GET", "/healthz")
    assert status == 200 and body["status"] == "alive"
    status, body, _ = request(server, "GET", "/readyz")
    assert status == 200 and body["status"] == "ready"
    assert post_image(server, png(24, 48), "?max_len=4")[0] == 200
    assert post_image(server, b"junk")[0] == 400
    status, text, headers = request(server, "GET", "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain")
    for name in ("fastcomer_requests_total", "fastcomer_request_seconds_bucket", "fastcomer_queue_depth",
                 "fastcomer_running_images", "fastcomer_step_rows_bucket", "fastcomer_decode_steps_total"):
        assert name in text
    counts = {line.split()[0]: float(line.split()[1]) for line in text.splitlines() if line.startswith("fastcomer_")}
    assert counts['fastcomer_requests_total{status="200"}'] >= 1
    assert counts['fastcomer_requests_total{status="400"}'] >= 1
    assert counts["fastcomer_decode_steps_total"] >= 3
    status, body, _ = request(server, "GET", "/nowhere")
    assert status == 404 and "error" in body
    assert request(server, "GET", "/v1/recognize")[0] == 405


def test_queue_full_is_503_with_retry_after_and_timeout_is_504(checkpoint):
    settings = ServeSettings(checkpoint=str(checkpoint), max_batch=1, max_queue=1, timeout_s=1.5, max_len=400)
    with running_server(settings) as port:
        results = {}

        def send(name, query):
            results[name] = post_image(port, png(128, 512), query)

        # the first runs (far longer than the timeout), the second waits in the queue, the third finds it full
        threads = [threading.Thread(target=send, args=(name, "?beam_size=10&max_len=400")) for name in ("a", "b")]
        for thread in threads:
            thread.start()
            time.sleep(0.3)
        status, body, headers = post_image(port, png(20, 20))
        assert status == 503 and headers["retry-after"] == "1" and "busy" in body["error"]
        for thread in threads:
            thread.join(60)
        assert [results[name][0] for name in ("a", "b")] == [504, 504]
        assert "1.5 s" in results["a"][1]["error"]
        # the timed-out searches were cancelled: the worker is free again
        assert post_image(port, png(20, 20), "?max_len=4")[0] == 200
