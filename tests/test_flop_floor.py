"""fastcomer.flop_floor: the FLOPs of a search counted per image and the floor they give."""
import pytest
import torch

from fastcomer.flop_floor import CONVOLUTIONS, flop_floor

from support.random_models import random_images, random_model


def test_floor_counts_per_image_and_divides_by_the_rates():
    model = random_model(1, dtype=torch.float32)
    settings = dict(beam_size=2, max_len=4)
    img, mask = random_images(0, [(32, 48)], dtype=torch.float32)
    one = flop_floor(model, img, mask, **settings)
    two = flop_floor(model, img.expand(2, -1, -1, -1), mask.expand(2, -1, -1), **settings)
    # Two copies of an image decode as two searches of it: the same FLOPs per image.
    assert two["flops_by_op"] == pytest.approx(one["flops_by_op"])
    conv = sum(n for op, n in one["flops_by_op"].items() if op in CONVOLUTIONS)
    assert conv > 0 and one["flops_per_image"] > conv
    assert one["flops_per_image"] == sum(one["flops_by_op"].values())
    rates = one["rates_gflop_s"]
    expected = conv / (rates["conv"] * 1e9) + (one["flops_per_image"] - conv) / (rates["matmul"] * 1e9)
    assert one["floor_s_per_image"] == pytest.approx(expected)
    assert one["threads"] == 1


def test_encoder_share_of_the_floor():
    model = random_model(2, dtype=torch.float32)
    img, mask = random_images(0, [(32, 48)], dtype=torch.float32)
    floor = flop_floor(model, img, mask, beam_size=2, max_len=4)
    # the encoder's FLOPs are part of the search's, at the same rates
    assert 0 < floor["encoder_flops_per_image"] < floor["flops_per_image"]
    assert 0 < floor["encoder_floor_s_per_image"] < floor["floor_s_per_image"]
    slowest = 1e9 * min(floor["rates_gflop_s"].values())
    assert floor["encoder_floor_s_per_image"] <= floor["encoder_flops_per_image"] / slowest * (1 + 1e-9)
