"""fastcomer.recognize and prepare_image: CoMER's evaluation preprocessing, then decode_images."""
import numpy as np
import pytest
import torch

PIL = pytest.importorskip("PIL.Image")

from fastcomer import RecognitionError, decode_images, prepare_image, recognize  # noqa: E402
from fastcomer.vocab import vocab  # noqa: E402

from support.images import strokes  # noqa: E402
from support.public_comer import standin_lit_comer  # noqa: E402
from support.random_models import random_images, random_model  # noqa: E402

SEARCH = dict(beam_size=2, max_len=6)


@pytest.fixture(scope="module")
def model():
    return random_model(6, torch.float32).eval()


@pytest.mark.parametrize("shape, expected", [((8, 20), (16, 40)), ((300, 700), (256, 597)), ((40, 100), (40, 100)),
                                             ((100, 2000), (51, 1024)), ((10, 13), (16, 21))])
def test_scaled_into_comer_limits(shape, expected):
    image = prepare_image(strokes(*shape), invert=False)
    assert image.shape == (1, *expected) and image.dtype == torch.float32


def test_to_tensor_scaling_and_inversion():
    dark = strokes(20, 40)
    kept = prepare_image(dark)  # mostly dark: not inverted by "auto"
    assert torch.equal(kept[0], torch.tensor(dark, dtype=torch.float32) / 255)
    assert torch.equal(prepare_image(255 - dark), kept)  # mostly light: inverted
    assert torch.equal(prepare_image(dark, invert=True), 1 - kept)
    assert torch.equal(prepare_image(255 - dark, invert=False), 1 - kept)
    floats = dark.astype(np.float32) / 255  # float pixels are taken as they are, as ToTensor does
    assert torch.equal(prepare_image(floats), kept)
    with pytest.raises(ValueError, match="invert must be"):
        prepare_image(dark, invert="yes")


def test_every_image_kind_gives_the_same_input(tmp_path):
    gray = strokes(20, 40)
    rgb = np.stack([gray, gray, gray], axis=2)
    path = tmp_path / "formula.png"
    PIL.fromarray(rgb).save(path)
    expected = prepare_image(gray)
    for image in (path, str(path), PIL.open(path), rgb, torch.from_numpy(rgb).permute(2, 0, 1), torch.from_numpy(gray),
                  torch.from_numpy(gray)[None], gray[:, :, None]):
        assert torch.equal(prepare_image(image), expected), type(image)


def test_colour_to_gray_as_pil():
    rgb = np.random.RandomState(0).randint(0, 256, (20, 40, 3)).astype(np.uint8)
    gray = np.asarray(PIL.fromarray(rgb).convert("L"))
    assert torch.equal(prepare_image(rgb, invert=False), prepare_image(gray, invert=False))


def test_resize_matches_opencv():
    cv2 = pytest.importorskip("cv2")
    rng = np.random.RandomState(0)
    for height, width in [(300, 700), (10, 40), (5, 300), (600, 90)]:
        image = rng.randint(0, 256, (height, width)).astype(np.uint8)
        from fastcomer.recognize import limit_range_scale

        scale = limit_range_scale(height, width)
        expected = cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_LINEAR)
        got = prepare_image(image, invert=False)[0] * 255
        assert got.shape == expected.shape
        assert (got - torch.tensor(expected, dtype=torch.float32)).abs().max() <= 1.0 + 1e-4  # cv2's fixed point


@pytest.mark.parametrize("bad, match", [(np.zeros((3, 4, 5)), "shape"), (np.full((20, 40), np.nan), "finite"),
                                        (np.full((20, 40), 2.0), r"\[0, 1\]"), (np.zeros((0, 5), np.uint8), "empty"),
                                        (np.zeros((2, 400), np.uint8), "aspect ratio"), ("missing.png", "No such file"),
                                        (np.zeros((20, 40), np.int32), "uint8, uint16, bool or float"), (3, "got int")])
def test_invalid_images(bad, match):
    with pytest.raises((ValueError, TypeError, OSError), match=match):
        prepare_image(bad)


def test_recognize_is_decode_images_on_the_prepared_images(model):
    images = [strokes(20, 40, 0), strokes(20, 40, 1, light_on_dark=False), strokes(30, 30, 2)]
    expected = decode_images(model, [prepare_image(im) for im in images], batch_size=2, **SEARCH)
    assert recognize(model, images, batch_size=2, **SEARCH) == [vocab.indices2label(h.seq) for h in expected]
    details = recognize(model, images, batch_size=2, details=True, **SEARCH)
    assert [(r.tokens, r.score) for r in details] == [(h.seq, h.score) for h in expected]
    assert [r.name for r in details] == ["image 0", "image 1", "image 2"]


def test_failed_images_are_named_and_the_others_decoded(model, tmp_path):
    good = tmp_path / "good.png"
    PIL.fromarray(strokes(20, 40)).save(good)
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"not an image")
    images = [good, tmp_path / "absent.png", corrupt, np.full((20, 40), np.nan)]
    results = recognize(model, images, details=True, **SEARCH)
    assert results[0].error is None and results[0].latex == recognize(model, [good], **SEARCH)[0]
    assert [r.name for r in results[1:]] == [str(tmp_path / "absent.png"), str(corrupt), "image 3"]
    assert all(r.error and r.latex is None for r in results[1:])
    with pytest.raises(RecognitionError, match="3 of 4 images failed: .*absent.png") as err:
        recognize(model, images, **SEARCH)
    assert err.value.results[0].latex == results[0].latex


def test_recognize_accepts_public_modules(model):
    lit = standin_lit_comer(6, torch.float32)
    images = [strokes(20, 40)]
    assert recognize(lit, images, **SEARCH) == recognize(lit.comer_model, images, **SEARCH) == recognize(model, images, **SEARCH)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_recognize_half_precision(dtype):
    # random_model(6) on this image: the float32 answer wins by > 0.5 nats (tests/search/test_half_precision.py);
    # 16 x 32 float pixels are within CoMER's limits: prepared as they are
    image = random_images(6, [(16, 32)], torch.float32)[0][0]
    float32 = random_model(6, torch.float32).eval()
    half = random_model(6, torch.float32).to(dtype).eval()
    assert recognize(half, [image], beam_size=2, max_len=8, invert=False) == recognize(float32, [image], beam_size=2, max_len=8, invert=False)


def test_bad_arguments(model):
    with pytest.raises(ValueError, match="batch_size"):
        recognize(model, [strokes(20, 40)], batch_size=0)
    with pytest.raises(TypeError, match="sequence of images"):
        recognize(model, strokes(20, 40))
