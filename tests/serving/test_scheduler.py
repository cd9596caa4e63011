"""The in-flight scheduler: every answer is that of decoding the image alone (`beam_search` of a
batch of one), whatever shares the batch and whenever it joins; cancellation frees slots at once;
the bounds and the checks hold."""
import threading
import time

import pytest
import torch

from fastcomer import beam_search
from fastcomer.serving import QueueFull, Scheduler, SchedulerClosed
from fastcomer.serving.scheduler import RunningSet
from support.random_models import random_model
from support.tolerances import RTOL

SIZES = [(32, 48), (16, 80), (48, 32), (20, 20), (33, 65), (16, 16), (64, 40), (17, 33)]
SETTINGS = [dict(beam_size=3, max_len=16), dict(beam_size=3, max_len=7), dict(beam_size=2, max_len=10),
            dict(beam_size=3, max_len=20), dict(beam_size=3, max_len=9, direction="l2r"), dict(beam_size=3, max_len=16),
            dict(beam_size=3, max_len=25), dict(beam_size=3, max_len=16, alpha=0.5)]
# step of the scheduler after which each request is submitted: some at once, most mid-flight
JOIN_AT = [0, 0, 2, 2, 3, 6, 6, 9]


def images(seed, dtype, sizes=SIZES):
    gen = torch.Generator().manual_seed(seed)
    return [torch.rand(1, h, w, generator=gen, dtype=dtype) for h, w in sizes]


def alone(model, image, **settings):
    return beam_search(model, image[None], torch.zeros(1, *image.shape[1:], dtype=torch.bool), **settings)[0]


def run_schedule(scheduler, imgs, settings, join_at):
    """Submit request i after join_at[i] steps of the scheduler (from its on_step hook); their answers."""
    steps, requests, lock = [0], {}, threading.Lock()

    def submit_due():
        with lock:
            for i, at in enumerate(join_at):
                if at <= steps[0] and i not in requests:
                    requests[i] = scheduler.submit(imgs[i], **settings[i])

    def on_step(rows, seconds):
        steps[0] += 1
        submit_due()

    scheduler.on_step = on_step
    submit_due()
    deadline = time.monotonic() + 120
    while len(requests) < len(join_at) and time.monotonic() < deadline:
        time.sleep(0.005)
    return [requests[i].result(120) for i in range(len(join_at))]


@pytest.mark.parametrize("seed, dtype", [(0, torch.float64), (7, torch.float64), (5, torch.float32)])
def test_answers_equal_decoding_alone(seed, dtype):
    # Mixed sizes (the decoder memory grows and shrinks), settings (beam sizes, directions, alpha,
    # max_len: running sets of their own, per-search ends) and joins mid-flight, 3 images at most.
    model = random_model(seed, dtype)
    imgs = images(seed, dtype)
    expected = [alone(model, im, **kw) for im, kw in zip(imgs, SETTINGS)]
    scheduler = Scheduler(model, max_images=3)
    try:
        answers = run_schedule(scheduler, imgs, SETTINGS, JOIN_AT)
    finally:
        scheduler.close()
    rel = RTOL[dtype]
    for want, got in zip(expected, answers):
        assert got.seq == want.seq
        assert got.score == pytest.approx(want.score, rel=rel, abs=rel)


def test_golden_model_answers_equal_decoding_alone(golden_model):
    # The golden weights (cross and self coverage: the ARM on padded memory) with many requests at once.
    imgs = images(3, torch.float64, [(40, 56), (16, 24), (24, 90), (56, 40), (32, 32), (18, 70)])
    settings = [dict(beam_size=3, max_len=12)] * 3 + [dict(beam_size=3, max_len=8)] * 3
    expected = [alone(golden_model, im, **kw) for im, kw in zip(imgs, settings)]
    scheduler = Scheduler(golden_model, max_images=6)
    try:
        answers = run_schedule(scheduler, imgs, settings, [0, 0, 1, 3, 3, 5])
    finally:
        scheduler.close()
    for want, got in zip(expected, answers):
        assert got.seq == want.seq and got.score == pytest.approx(want.score, rel=1e-9)


def test_graph_policy_answers_equal_decoding_alone(graph_policy):
    # As on CUDA with graphs (power-of-two slots, done flags read every few steps), run eagerly.
    model = random_model(7, torch.float64)
    imgs = images(7, torch.float64)[:5]
    expected = [alone(model, im, **kw) for im, kw in zip(imgs, SETTINGS)]
    scheduler = Scheduler(model, max_images=4)
    assert scheduler.plan.graphs
    try:
        answers = run_schedule(scheduler, imgs, SETTINGS[:5], JOIN_AT[:5])
    finally:
        scheduler.close()
    assert [a.seq for a in answers] == [e.seq for e in expected]
    assert [a.score for a in answers] == pytest.approx([e.score for e in expected], rel=1e-9)


def test_state_positions_shift_back_when_late_searches_need_room():
    # A running set whose searches joined late is rebuilt with its earliest start at position 0,
    # and its positions sized to what the searches need, not grown without end.
    model = random_model(0, torch.float64)
    imgs = images(0, torch.float64, [(16, 16)] * 6)
    settings = [dict(beam_size=2, max_len=20)] * 6
    expected = [alone(model, im, **kw) for im, kw in zip(imgs, settings)]
    capacities = []
    original = RunningSet._rebuild

    def recording(self, extra=None):
        original(self, extra)
        capacities.append((self.capacity, self.length))

    RunningSet._rebuild = recording
    try:
        scheduler = Scheduler(model, max_images=2)
        try:
            answers = run_schedule(scheduler, imgs, settings, [0, 5, 10, 15, 20, 25])
        finally:
            scheduler.close()
    finally:
        RunningSet._rebuild = original
    assert [a.seq for a in answers] == [e.seq for e in expected]
    assert max(capacity for capacity, _ in capacities) <= 64
    assert any(length > 1 for _, length in capacities)  # some rebuild kept running searches


def test_requests_admitted_together_join_in_one_resize(monkeypatch):
    # Requests queued at one boundary join the running set together: one new state sized for all
    # of them (not one per joiner, each copying the caches of the last).
    model = random_model(4, torch.float64)
    imgs = images(4, torch.float64, [(16, 32), (32, 16), (16, 16)])
    expected = [alone(model, im, beam_size=2, max_len=8) for im in imgs]
    resizes = []
    original = RunningSet._rebuild

    def recording(self, extra=None):
        original(self, extra)
        resizes.append((extra, len(self.members)))

    monkeypatch.setattr(RunningSet, "_rebuild", recording)
    scheduler = Scheduler(model, max_images=3)
    try:
        with scheduler._lock:  # re-entrant: the decoding thread sees the three queued at once
            requests = [scheduler.submit(im, beam_size=2, max_len=8) for im in imgs]
        answers = [r.result(60) for r in requests]
    finally:
        scheduler.close()
    assert [a.seq for a in answers] == [e.seq for e in expected]
    assert resizes[0] == ((3 * 2, 2, 2, 8), 3 * 2)  # 3 images x 2 directions, the largest map 2 x 2
    assert all(extra is None for extra, _ in resizes[1:])  # then only compactions


def test_cancel_frees_slots_at_the_next_step():
    model = random_model(1, torch.float64)
    long, short = images(1, torch.float64, [(32, 32), (16, 16)])
    rows = []
    scheduler = Scheduler(model, max_images=4, on_step=lambda r, s: rows.append(r))
    try:
        first = scheduler.submit(long, beam_size=3, max_len=150)
        second = scheduler.submit(short, beam_size=3, max_len=150)
        while len(rows) < 3:
            time.sleep(0.005)
        second.cancel()
        with pytest.raises(Exception):  # CancelledError
            second.result(10)
        before = len(rows)
        deadline = time.monotonic() + 30
        while len(rows) < before + 3 and time.monotonic() < deadline:
            time.sleep(0.005)
        assert rows[3] == 12 and rows[-1] == 6, rows[:8]  # 2 images x 2 directions x 3 beams, then 1 image
        queued = scheduler.submit(short, beam_size=3, max_len=150)
        queued.cancel()
        first.cancel()
        deadline = time.monotonic() + 30
        while scheduler.running() and time.monotonic() < deadline:
            time.sleep(0.005)
        assert scheduler.running() == 0 and scheduler.queued() == 0
        assert first.future.cancelled() and queued.future.cancelled()
        after = scheduler.submit(short, beam_size=2, max_len=6).result(30)  # still serving
        assert after.seq == alone(model, short, beam_size=2, max_len=6).seq
    finally:
        scheduler.close()


def test_bounds_and_first_in_first_out_admission():
    model = random_model(2, torch.float64)
    # feature maps of 1 x 1 positions, and one of 4 x 8 that fills max_positions alone
    imgs = images(2, torch.float64, [(16, 16), (64, 128), (16, 16), (16, 16)])
    started = []
    scheduler = Scheduler(model, max_images=2, max_positions=2 * 32,
                          on_step=lambda r, s: started.append((r, scheduler.running())))
    try:
        requests = [scheduler.submit(im, beam_size=2, max_len=8) for im in imgs]
        answers = [r.result(60) for r in requests]
    finally:
        scheduler.close()
    assert all(running <= 2 for _, running in started)
    assert max(rows for rows, _ in started) <= 2 * 2 * 2
    # the large image (too many positions beside another) ran alone, and the small ones behind it
    # waited for it rather than passing it: the first alone, then the large one alone, then 2 (the
    # images running after each step: 0 once a phase's last search left)
    phases = [running for i, (_, running) in enumerate(started) if i == 0 or running != started[i - 1][1]]
    assert phases == [1, 0, 1, 0, 2, 0]
    assert [a.seq for a in answers] == [alone(model, im, beam_size=2, max_len=8).seq for im in imgs]


def test_submit_checks_and_closing():
    model = random_model(0, torch.float64)
    scheduler = Scheduler(model, max_queue=1)
    try:
        with pytest.raises(TypeError, match="floating-point"):
            scheduler.submit(torch.zeros(1, 16, 16, dtype=torch.uint8))
        with pytest.raises(ValueError, match=r"\[1, H, W\]"):
            scheduler.submit(torch.zeros(2, 16, 16))
        with pytest.raises(ValueError, match="beam_size"):
            scheduler.submit(torch.zeros(1, 16, 16), beam_size=0)
        with pytest.raises(ValueError, match="max_len"):
            scheduler.submit(torch.zeros(1, 16, 16), max_len=10**6)
        with pytest.raises(ValueError, match="NaN"):
            scheduler.submit(torch.full((1, 16, 16), float("nan")))
    finally:
        scheduler.close()
    with pytest.raises(SchedulerClosed):
        scheduler.submit(torch.zeros(1, 16, 16))
    with pytest.raises(ValueError, match="max_images"):
        Scheduler(model, max_images=0)


def test_queue_full():
    model = random_model(0, torch.float64)
    scheduler = Scheduler(model, max_images=1, max_queue=1)
    try:
        image = torch.rand(1, 16, 16, dtype=torch.float64)
        running = scheduler.submit(image, beam_size=2, max_len=100)
        while scheduler.queued():
            time.sleep(0.005)
        waiting = scheduler.submit(image, beam_size=2, max_len=4)
        with pytest.raises(QueueFull):
            scheduler.submit(image, beam_size=2, max_len=4)
        running.cancel()
        assert waiting.result(30).seq == alone(model, image, beam_size=2, max_len=4).seq
    finally:
        scheduler.close()


def test_a_failure_reaches_every_request():
    model = random_model(0, torch.float64)
    scheduler = Scheduler(model)

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    model.encoder.forward = broken
    request = scheduler.submit(torch.rand(1, 16, 16, dtype=torch.float64), beam_size=2, max_len=4)
    with pytest.raises(SchedulerClosed, match="boom"):
        request.result(30)
    with pytest.raises(SchedulerClosed, match="failed"):
        scheduler.submit(torch.rand(1, 16, 16, dtype=torch.float64))
    scheduler.close()


def test_late_searches_wait_for_room_in_the_positional_encoding():
    # With a position table of 24, a search of max_len 20 cannot join one 10 steps in (10 + 20 > 24):
    # it waits for the first to end, then runs; the state never outgrows the table.
    model = random_model(3, torch.float64)
    model.decoder.pos_enc.pe = model.decoder.pos_enc.pe[:24].clone()
    imgs = images(3, torch.float64, [(16, 32), (32, 16), (16, 16)])
    settings = [dict(beam_size=2, max_len=20), dict(beam_size=2, max_len=20), dict(beam_size=2, max_len=4)]
    expected = [alone(model, im, **kw) for im, kw in zip(imgs, settings)]
    capacities = []
    original = RunningSet._rebuild

    def recording(self, extra=None):
        original(self, extra)
        capacities.append(self.capacity)

    RunningSet._rebuild = recording
    try:
        scheduler = Scheduler(model, max_images=3)
        try:
            answers = run_schedule(scheduler, imgs, settings, [0, 10, 11])
        finally:
            scheduler.close()
    finally:
        RunningSet._rebuild = original
    assert [a.seq for a in answers] == [e.seq for e in expected]
    assert max(capacities) <= 24
