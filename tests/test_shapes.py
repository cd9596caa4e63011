"""fastcomer.shapes is the one declaration of the published configuration and shapes: it agrees
with the model's defaults and the encoder, and the op variants and `fastcomer env` read it."""
import pytest
import torch

from fastcomer import CoMER, shapes
from fastcomer.ops.arm_attention import variants as arm_variants
from fastcomer.ops.cross_attention_step import variants as step_variants
from fastcomer.ops.dispatch import PUBLISHED_ATTENTION


def test_published_config_is_the_models_defaults():
    model = CoMER()
    assert model.config == shapes.PUBLISHED
    assert (shapes.D_MODEL, shapes.NHEAD, shapes.HEAD_DIM, shapes.DC) == (256, 8, 32, 32)
    assert model.decoder.nhead == shapes.NHEAD and model.decoder.model.arm.conv.out_channels == shapes.DC


@torch.no_grad()
def test_feature_maps_are_the_encoders():
    encoder = CoMER(d_model=16, growth_rate=4, num_layers=1, nhead=2, dc=4).encoder.eval()
    for image, (height, width) in zip(shapes.IMAGE_SHAPES, shapes.FEATURE_MAPS):
        feature, _ = encoder(torch.rand(1, 1, *image), torch.zeros(1, *image, dtype=torch.bool))
        assert feature.shape[1:3] == (height, width)
    assert shapes.FEATURE_LENGTHS == (256, 1024)
    with pytest.raises(ValueError, match="multiples of 16"):
        shapes.feature_map((100, 512))


def test_variants_and_env_read_the_published_shapes():
    assert step_variants.SHAPES["published"]["lengths"] == shapes.FEATURE_LENGTHS
    assert {(s.nhead, s.head_dim, s.dc, s.images) for s in arm_variants.SHAPES["published"]} == {
        (shapes.NHEAD, shapes.HEAD_DIM, shapes.DC, shapes.TRAIN_BATCH)}
    assert [(s.height, s.width) for s in arm_variants.SHAPES["published"]] == list(shapes.TRAIN_FEATURE_MAPS)
    assert PUBLISHED_ATTENTION == dict(nhead=shapes.NHEAD, head_dim=shapes.HEAD_DIM, dc=shapes.DC)
