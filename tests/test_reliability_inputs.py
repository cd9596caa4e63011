"""Issue 21, one test (or parametrized row) per class of problem: images decoded as people have
them (bit depths, transparency, palettes, EXIF orientation), one bad file never losing the other
answers, checkpoints saved on a GPU, decode_images' checks and daemonic processes, search
arguments at their extremes, the optional extras, and every command's usage errors (exit
status 2, one line, no traceback). A property-based test draws image files."""
import io
import multiprocessing
import struct
import warnings
import zlib

import numpy as np
import pytest
import torch

PIL = pytest.importorskip("PIL.Image")
from PIL import Image  # noqa: E402

from fastcomer import beam_search, decode_images, greedy_search, load_comer, prepare_image, recognize  # noqa: E402
from fastcomer import reference_beam_search  # noqa: E402
from fastcomer.checkpoint import CheckpointError  # noqa: E402
from fastcomer.cli import main  # noqa: E402
from fastcomer.extras import MissingExtra, require  # noqa: E402
from fastcomer.recognize import ImageError, ImageTooLarge  # noqa: E402
from fastcomer.search.options import SearchOptions  # noqa: E402

from support.images import strokes  # noqa: E402
from support.random_models import random_images, random_model  # noqa: E402
from support.search_cases import assert_same_search  # noqa: E402

SEARCH = dict(beam_size=2, max_len=6)


@pytest.fixture(scope="module")
def model():
    return random_model(6, torch.float32).eval()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, model):
    path = tmp_path_factory.mktemp("ckpt") / "comer.ckpt"
    coverage = {"cross_coverage": model.config.cross_coverage, "self_coverage": model.config.self_coverage}
    torch.save({"state_dict": {"comer_model." + k: v for k, v in model.state_dict().items()},
                "hyper_parameters": coverage}, path)
    return path


def png_bytes(image, **save) -> bytes:
    out = io.BytesIO()
    image.save(out, "PNG", **save)
    return out.getvalue()


def with_chunk(data: bytes, kind: bytes, body: bytes, crc=None) -> bytes:
    """data with its first `kind` chunk's body (and CRC) replaced."""
    at = data.index(kind) - 4
    length = struct.unpack(">I", data[at:at + 4])[0]
    crc = zlib.crc32(kind + body) if crc is None else crc
    return data[:at] + struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc) + data[at + 12 + length:]


# --- Images decoded wrongly, silently -------------------------------------------------------

def test_16_bit_grayscale_is_scaled_not_clipped(tmp_path):
    values = (np.arange(32 * 48).reshape(32, 48) * 40).astype(np.uint16)  # 0..61400
    Image.fromarray(values).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode == "I;16"
    got = prepare_image(tmp_path / "deep.png", invert=False)
    assert torch.equal(got, torch.from_numpy(values / 65535).float()[None])
    assert len(torch.unique(got)) > 1000  # convert("L") left only 0 and 1
    Image.fromarray(values).save(tmp_path / "deep.pgm")  # Pillow reads 16-bit PGM as mode "I"
    assert torch.equal(prepare_image(tmp_path / "deep.pgm", invert=False), got)
    assert torch.equal(prepare_image(values, invert=False), got)  # and a uint16 array


@pytest.mark.parametrize("ink", [0, 255], ids=["dark_strokes", "light_strokes"])
def test_strokes_on_transparency_read_as_strokes(tmp_path, ink):
    mask = strokes(24, 40, 1) > 0
    opaque = np.where(mask, ink, 255 - ink).astype(np.uint8)  # the same strokes on an opaque paper
    rgba = np.zeros((24, 40, 4), np.uint8)
    rgba[..., :3] = ink
    rgba[..., 3] = np.where(mask, 255, 0)
    Image.fromarray(rgba).save(tmp_path / "t.png")
    expected = prepare_image(opaque)
    assert expected.sum() > 0 and torch.equal(expected[0] > 0.5, torch.from_numpy(mask))
    assert torch.equal(prepare_image(tmp_path / "t.png"), expected)
    assert torch.equal(prepare_image(rgba), expected)  # an H x W x 4 array
    assert torch.equal(prepare_image(Image.open(tmp_path / "t.png").convert("LA")), expected)


def test_a_picture_with_transparent_margins_keeps_its_paper(tmp_path):
    paper = np.full((24, 40), 255, np.uint8)
    paper[10:13, 5:30] = 0  # dark strokes on an opaque white paper, a transparent margin
    rgba = np.stack([paper] * 3 + [np.full((24, 40), 255, np.uint8)], axis=2)
    rgba[:, 36:, 3] = 0
    rgba[:, 36:, :3] = 0  # black under the transparency
    assert torch.equal(prepare_image(rgba), prepare_image(paper))


def test_palette_with_transparency(tmp_path):
    mask = strokes(20, 40, 2) > 0
    image = Image.fromarray(mask.astype(np.uint8), "P")
    image.putpalette([200, 200, 200, 0, 0, 0])  # index 0: a light grey, transparent; 1: black strokes
    image.save(tmp_path / "p.png", transparency=0)
    assert torch.equal(prepare_image(tmp_path / "p.png"), prepare_image(np.where(mask, 0, 255).astype(np.uint8)))


def test_exif_orientation_is_applied(tmp_path):
    stored = strokes(20, 44, 3)
    exif = Image.Exif()
    exif[0x0112] = 6  # the camera was turned: show the stored pixels turned 90 degrees clockwise
    Image.fromarray(stored).save(tmp_path / "phone.png", exif=exif)
    got = prepare_image(tmp_path / "phone.png", invert=False)
    assert got.shape == (1, 44, 20)
    assert torch.equal(got, prepare_image(np.ascontiguousarray(np.rot90(stored, -1)), invert=False))


# --- One bad file loses every answer --------------------------------------------------------

def split_idat_broken(data: bytes) -> bytes:
    """data (a PNG) with its IDAT split in two, the second chunk's type garbled: Pillow's PNG
    plugin raises SyntaxError while decoding the pixels."""
    at = data.index(b"IDAT") - 4
    length = struct.unpack(">I", data[at:at + 4])[0]
    body, half = data[at + 8:at + 8 + length], length // 2
    first = struct.pack(">I", half) + b"IDAT" + body[:half] + struct.pack(">I", zlib.crc32(b"IDAT" + body[:half]))
    second = struct.pack(">I", length - half) + b"\x00\x01\x02\x03" + body[half:] + b"\0\0\0\0"
    return data[:at] + first + second + data[at + 12 + length:]


def bad_files(folder):
    good = png_bytes(Image.fromarray(strokes(20, 40, 0)))
    huge = with_chunk(good, b"IHDR", struct.pack(">IIBBBBB", 20000, 20000, 8, 0, 0, 0, 0))
    files = {"broken_chunk.png": split_idat_broken(good),  # Pillow: SyntaxError
             "bomb.png": huge,  # Pillow: DecompressionBombError
             "truncated.png": good[: len(good) // 2],
             "text.png": b"not an image at all"}
    paths = {}
    for name, data in files.items():
        paths[name] = folder / name
        paths[name].write_bytes(data)
    (folder / "good.png").write_bytes(good)
    return folder / "good.png", paths


@pytest.mark.parametrize("name, reason", [("broken_chunk.png", "SyntaxError: broken PNG file"), ("bomb.png", "decompression bomb"),
                                          ("truncated.png", "truncated"), ("text.png", "not an image file")])
def test_a_bad_file_is_one_image_error(tmp_path, name, reason):
    _, paths = bad_files(tmp_path)
    with pytest.raises(ImageError, match=reason):
        prepare_image(paths[name])


def test_one_bad_file_keeps_the_other_answers(tmp_path, model):
    good, paths = bad_files(tmp_path)
    results = recognize(model, [good, *paths.values(), good], details=True, **SEARCH)
    assert [r.error is None for r in results] == [True, False, False, False, False, True]
    assert results[0].latex == results[-1].latex and results[0].tokens is not None
    assert all(r.name == str(p) and r.error for r, p in zip(results[1:5], paths.values()))


def test_the_pixel_limit_is_an_option(tmp_path):
    Image.fromarray(strokes(20, 40, 0)).save(tmp_path / "a.png")
    with pytest.raises(ImageTooLarge, match="20 pixels, more than max_pixels=100"):
        prepare_image(tmp_path / "a.png", max_pixels=100)
    assert prepare_image(tmp_path / "a.png", max_pixels=800).shape == (1, 20, 40)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Pillow's DecompressionBombWarning stays Pillow's business
        prepare_image(tmp_path / "a.png")
    with pytest.raises(ValueError, match="max_pixels must be a positive int"):
        prepare_image(tmp_path / "a.png", max_pixels=0)


def test_the_command_prints_every_good_line_and_names_each_bad_file(tmp_path, checkpoint, capsys):
    good, paths = bad_files(tmp_path)
    code = main(["recognize", "--checkpoint", str(checkpoint), "--beam-size", "2", "--max-len", "6", str(good),
                 *map(str, paths.values())])
    out, err = capsys.readouterr()
    assert code == 1 and out.startswith(f"{good}\t") and len(out.splitlines()) == 1
    assert "Traceback" not in err and [line.split(": ")[1] for line in err.splitlines()] == list(map(str, paths.values()))


# --- Checkpoints saved on a GPU ---------------------------------------------------------------

def test_a_cuda_checkpoint_loads_on_the_cpu(tmp_path, model, monkeypatch):
    path = tmp_path / "gpu.ckpt"
    with monkeypatch.context() as patched:  # torch.save as on a GPU: every storage tagged cuda:0
        patched.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
        torch.save(model.state_dict(), path)
    if torch.cuda.is_available():
        pytest.skip("a CUDA machine loads it on the GPU")
    loaded = load_comer(path, config={"cross_coverage": model.config.cross_coverage,
                                      "self_coverage": model.config.self_coverage})
    assert next(loaded.parameters()).device.type == "cpu"
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available")
def test_map_location_cuda_without_cuda_is_a_clear_error(model):
    with pytest.raises(ValueError, match="CUDA is not available here; pass map_location='cpu'"):
        load_comer(model.state_dict(), map_location="cuda")
    with pytest.raises(ValueError, match="map_location: expected a device"):
        load_comer(model.state_dict(), map_location="gpu0")
    with pytest.raises(TypeError, match="map_location must be"):
        load_comer(model.state_dict(), map_location=3)


def test_a_checkpoint_error_is_never_cut(tmp_path):
    path = tmp_path / "broken.ckpt"
    path.write_bytes(b"PK\x03\x04" + b"x" * 100)  # a zip archive's start, then nothing
    with pytest.raises(CheckpointError) as err:
        load_comer(path)
    message = str(err.value)
    assert "not a torch checkpoint" not in message and message.endswith(".") and len(message) > 200


# --- decode_images --------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, error, match", [
    (dict(beam_size=0), ValueError, "beam_size must be at least 1"),
    (dict(beam_size=2, max_len=1), ValueError, "max_len must be at least 2"),
    (dict(beam_size=1000), ValueError, "beam_size must be in 1.."),
    (dict(beem_size=2), TypeError, "unknown search arguments"),
    (dict(threads=0), ValueError, "threads"),
])
@pytest.mark.parametrize("images", [2, 0], ids=["images", "no_images"])
def test_decode_images_checks_before_forking(model, monkeypatch, kwargs, error, match, images):
    from fastcomer.search import images as module

    monkeypatch.setattr(module, "ProcessPoolExecutor", lambda *a, **k: pytest.fail("forked before the checks"))
    with pytest.raises(error, match=match):
        decode_images(model, [torch.rand(1, 20, 32)] * images, workers=2, **kwargs)


def test_decode_images_needs_eval_mode(model):
    training = random_model(6, torch.float32).train()
    with pytest.raises(ValueError, match="eval mode"):
        decode_images(training, [], beam_size=2)


def _decode_in_worker(model, images):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        answers = decode_images(model, images, workers=2, **SEARCH)
    return [(h.seq, h.score) for h in answers], [str(w.message) for w in caught]


def test_decode_images_inside_a_daemonic_process(model):
    images = [torch.rand(1, 20, 32, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    alone = [(h.seq, h.score) for h in decode_images(model, images, workers=1, **SEARCH)]
    with multiprocessing.get_context("fork").Pool(1) as pool:  # its workers are daemonic
        answers, caught = pool.apply(_decode_in_worker, (model, images))
    assert answers == alone and any("daemonic" in message for message in caught)


# --- Search arguments -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def case():
    model = random_model(3)
    img, mask = random_images(3, [(32, 48), (20, 32)])
    return model, img, mask


@pytest.mark.parametrize("alpha", [400.0, -400.0, 2**63, -(2**63)], ids=["400", "-400", "2**63", "-2**63"])
def test_extreme_alphas_search_to_the_end(case, alpha):
    model, img, mask = case
    out = beam_search(model, img, mask, beam_size=3, max_len=10, alpha=alpha, return_details=True)
    assert_same_search(out, reference_beam_search(model, img, mask, beam_size=3, max_len=10, alpha=alpha,
                                                  return_details=True))
    assert all(not np.isnan(h.score) for h in greedy_search(model, img, mask, max_len=10, alpha=alpha))


def test_an_integer_alpha_answers_as_its_float(case):
    model, img, mask = case
    assert_same_search(beam_search(model, img, mask, beam_size=3, max_len=10, alpha=2, return_details=True),
                       beam_search(model, img, mask, beam_size=3, max_len=10, alpha=2.0, return_details=True))


def test_a_compiled_model_is_unwrapped(case):
    model, img, mask = case
    compiled = torch.compile(model)  # compiles lazily: the searches run their own step, never this graph
    assert_same_search(beam_search(compiled, img, mask, beam_size=3, max_len=10, return_details=True),
                       beam_search(model, img, mask, beam_size=3, max_len=10, return_details=True))


@pytest.mark.parametrize("field, value, error, match", [
    ("beam_size", 0, ValueError, "beam_size must be at least 1"), ("beam_size", 2.0, TypeError, "beam_size must be an int"),
    ("max_len", 1, ValueError, "max_len must be at least 2"), ("alpha", "1", TypeError, "alpha must be a real"),
    ("alpha", float("inf"), ValueError, "alpha must be finite"), ("temperature", 0.0, ValueError, "temperature must be positive"),
    ("early_stopping", 1, TypeError, "early_stopping must be a bool"), ("direction", "up", ValueError, "direction must be"),
])
def test_search_options_check_every_field(field, value, error, match):
    with pytest.raises(error, match=match):
        SearchOptions(**{field: value})
    assert SearchOptions(alpha=2).alpha == 2.0 and isinstance(SearchOptions(alpha=2).alpha, float)


# --- Optional extras ----------------------------------------------------------------------------

def hide(monkeypatch, *names):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in names else real(name, *a))


def test_require_names_the_extra(monkeypatch):
    hide(monkeypatch, "onnxscript")
    with pytest.raises(MissingExtra) as err:
        require("onnx", "onnx", "onnxscript", purpose="exporting")
    assert str(err.value) == 'exporting needs onnxscript, not installed: pip install "fastcomer[onnx]"'
    require("onnx", "onnxscript|onnx", purpose="either")  # one of two names is enough


@pytest.mark.parametrize("argv, module, extra", [
    (["export-onnx", "--checkpoint", "CKPT", "OUT"], "onnxscript", "onnx"),
    (["plot", "RESULT", "--out", "OUT"], "matplotlib", "plot"),
    (["recognize", "--checkpoint", "CKPT", "IMAGE"], "PIL", "images"),
])
def test_a_command_missing_its_extra_says_one_line(monkeypatch, capsys, tmp_path, checkpoint, argv, module, extra):
    from support.paths import REPO

    (tmp_path / "a.png").write_bytes(b"")
    names = {"CKPT": str(checkpoint), "OUT": str(tmp_path / "out"), "IMAGE": str(tmp_path / "a.png"),
             "RESULT": str(REPO / "benchmarks/results/cpu-2threads-128x512-final.json")}
    hide(monkeypatch, module)
    assert main([names.get(arg, arg) for arg in argv]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.endswith(f'pip install "fastcomer[{extra}]"')


def test_reading_images_without_pillow(monkeypatch):
    hide(monkeypatch, "PIL")
    with pytest.raises(MissingExtra, match=r'pip install "fastcomer\[images\]"'):
        prepare_image("any.png")


# --- Every command's usage errors ----------------------------------------------------------

@pytest.fixture()
def places(tmp_path, checkpoint):
    from support.paths import REPO

    (tmp_path / "file").write_text("x")
    (tmp_path / "corrupt.json").write_text("{not json")
    (tmp_path / "dir").mkdir()
    Image.fromarray(strokes(20, 40, 0)).save(tmp_path / "a.png")
    return {"CKPT": str(checkpoint), "FILE": str(tmp_path / "file"), "MISSING": str(tmp_path / "missing"),
            "CORRUPT": str(tmp_path / "corrupt.json"), "DIR": str(tmp_path / "dir"), "IMAGE": str(tmp_path / "a.png"),
            "NOFOLDER": str(tmp_path / "nofolder" / "x.json"),
            "RESULT": str(REPO / "benchmarks/results/cpu-2threads-128x512-final.json")}


USAGE_ERRORS = [
    (["export-onnx", "--checkpoint", "CKPT", "FILE"], "is a file, expected a folder"),
    (["export-onnx", "--checkpoint", "MISSING", "DIR"], "no such file"),
    (["export-onnx", "--checkpoint", "CKPT", "DIR", "--batch", "0"], "expected a positive integer"),
    (["export-onnx", "--checkpoint", "CKPT", "DIR", "--max-len", "1"], "expected an integer >= 2"),
    (["export-onnx", "--checkpoint", "CKPT", "DIR", "--max-len", "501"], "--max-len must be in 2..500"),
    (["export-onnx", "--checkpoint", "FILE", "DIR"], "--checkpoint: cannot read checkpoint"),
    (["bench", "--max-len", "1"], "expected an integer >= 2"),
    (["bench", "--beam-size", "100"], "--beam-size must be at most 56"),
    (["bench", "--out", "FILE/x"], "is not a folder"),
    (["compare", "MISSING", "RESULT"], "no such file"),
    (["compare", "RESULT", "CORRUPT"], "not a result file"),
    (["table", "CORRUPT"], "not a result file"),
    (["table", "--readme", "MISSING"], "no such file"),
    (["plot", "CORRUPT", "--out", "DIR"], "not a result file"),
    (["plot", "RESULT", "--out", "FILE"], "is a file, expected a folder"),
    (["kernels", "--json", "NOFOLDER"], "does not exist"),
    (["kernels", "--json", "DIR"], "is a folder, expected a file name"),
    (["recognize", "--checkpoint", "CKPT", "IMAGE", "--max-len", "1"], "expected an integer >= 2"),
    (["recognize", "--checkpoint", "CKPT", "IMAGE", "--max-len", "501"], "--max-len must be in 2..500"),
    (["recognize", "--checkpoint", "MISSING", "IMAGE"], "--checkpoint: cannot read checkpoint"),
    (["recognize", "--checkpoint", "CKPT", "IMAGE", "--max-pixels", "0"], "expected a positive integer"),
]


@pytest.mark.parametrize("argv, message", USAGE_ERRORS, ids=[" ".join(a[:1] + a[-2:]) for a, _ in USAGE_ERRORS])
def test_usage_errors_exit_2_in_one_line(places, capsys, argv, message):
    with pytest.raises(SystemExit) as exited:
        main([places.get(arg, arg).replace("FILE/", places["FILE"] + "/") for arg in argv])
    err = capsys.readouterr().err
    assert exited.value.code == 2 and "Traceback" not in err
    assert f"fastcomer {argv[0]}: error:" in err.splitlines()[-1] and message in err.splitlines()[-1]


def test_table_readme_naming_a_missing_result_fails_in_one_line(tmp_path, capsys):
    readme = tmp_path / "README.md"
    readme.write_text("<!-- results-table: absent.json -->\nold\n<!-- end results-table -->\n")
    assert main(["table", "--readme", str(readme)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "absent.json" in err


# --- Property: generated image files ------------------------------------------------------

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

# EXIF orientation -> the numpy view of the stored pixels a viewer shows (independent of Pillow)
ORIENTED = {1: lambda a: a, 2: np.fliplr, 3: lambda a: np.rot90(a, 2), 4: np.flipud, 5: lambda a: a.T,
            6: lambda a: np.rot90(a, -1), 7: lambda a: np.rot90(a, 2).T, 8: lambda a: np.rot90(a, 1)}
# (Pillow mode, format, whether it can hold an EXIF orientation)
KINDS = [("1", "PNG", True), ("L", "PNG", True), ("LA", "PNG", True), ("P", "PNG", True), ("RGB", "PNG", True),
         ("RGBA", "PNG", True), ("I;16", "PNG", True), ("I;16", "PPM", False), ("CMYK", "TIFF", False),
         ("RGB", "TIFF", False), ("RGBA", "TIFF", False), ("L", "BMP", False)]


def encode(mask: np.ndarray, mode: str, fmt: str, ink: int, transparent: bool, orientation: int) -> bytes:
    """The strokes of `mask` in `mode`: ink 0 (dark) or 1 (light), on the other one or on transparency."""
    if mode in ("LA", "RGBA", "P") and transparent:
        alpha = np.where(mask, 255, 0).astype(np.uint8)
    else:
        alpha = None
    level = np.where(mask, ink, 1 - ink) if alpha is None else np.full(mask.shape, ink)
    if mode == "I;16":
        image = Image.fromarray((level * 65535).astype(np.uint16))
    elif mode == "P":
        image = Image.fromarray(level.astype(np.uint8), "P")
        image.putpalette([0, 0, 0, 255, 255, 255])
        if alpha is not None:  # the paper's index transparent, a colour key
            image = Image.fromarray(mask.astype(np.uint8), "P")
            image.putpalette([255 * (1 - ink)] * 3 + [255 * ink] * 3)
    else:
        gray = Image.fromarray((level * 255).astype(np.uint8))
        image = gray.convert(mode if mode not in ("LA", "RGBA") else mode[:-1])
        if mode in ("LA", "RGBA"):
            image.putalpha(Image.fromarray(alpha if alpha is not None else np.full(mask.shape, 255, np.uint8)))
    save = {}
    if orientation != 1:
        exif = Image.Exif()
        exif[0x0112] = orientation
        save["exif"] = exif
    if mode == "P" and alpha is not None:
        save["transparency"] = 0
    out = io.BytesIO()
    image.save(out, fmt, **save)
    return out.getvalue()


@st.composite
def image_files(draw):
    mode, fmt, exif = draw(st.sampled_from(KINDS))
    height, width = draw(st.integers(16, 48)), draw(st.integers(16, 48))
    mask = np.zeros((height, width), bool)
    for _ in range(draw(st.integers(0, 3))):  # a few strokes, well under half the image
        r, c = draw(st.integers(0, height - 1)), draw(st.integers(0, width - 1))
        mask[r:r + draw(st.integers(1, 4)), c:c + draw(st.integers(1, width // 3))] = True
    transparent = mode in ("LA", "RGBA", "P") and draw(st.booleans())
    orientation = draw(st.integers(1, 8)) if exif else 1
    ink = draw(st.integers(0, 1))
    cut = draw(st.one_of(st.none(), st.floats(0.0, 0.9)))
    return mask, (mode, fmt, ink, transparent, orientation), cut


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
@given(image_files())
def test_generated_image_files_read_as_their_strokes(tmp_path_factory, drawn):
    mask, how, cut = drawn
    data = encode(mask, *how)
    path = tmp_path_factory.mktemp("drawn") / f"image.{how[1].lower()}"
    path.write_bytes(data if cut is None else data[: int(len(data) * cut)])
    expected = torch.from_numpy(np.ascontiguousarray(ORIENTED[how[4]](mask))).float()[None]
    if cut is None:
        assert torch.equal(prepare_image(path), expected), how
        return
    try:  # a cut file fails as an ImageError naming why, or reads whole (a cut after the pixels)
        got = prepare_image(path)
    except ImageError:
        return
    assert torch.equal(got, expected), how
