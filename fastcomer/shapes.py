"""CoMER's published configuration and the shapes fastcomer is measured and reported at, declared
once: the benchmarks, the static kernel report's variants (`ops/<op>/variants.py`), the plan
`fastcomer env` prints and the GPU tests read them from here.

The model is `CoMERConfig()` (its defaults are the published hyper-parameters); the search is
beam 10 in both directions; the benchmarked images are 128x512 and 256x1024 pixels, whose
feature maps (stride 16) are 8x32 and 16x64, so a decoding step attends over L = 256 or 1024
positions; training batches hold 16 images.
"""
from typing import Tuple

from .model.comer import CoMERConfig
from .model.encoder import FEATURE_STRIDE

PUBLISHED = CoMERConfig()
D_MODEL = PUBLISHED.d_model  # 256
NHEAD = PUBLISHED.nhead  # 8
HEAD_DIM = PUBLISHED.d_model // PUBLISHED.nhead  # 32
DC = PUBLISHED.dc  # 32: the ARM's channels
FEEDFORWARD = PUBLISHED.dim_feedforward  # 1024
DECODER_LAYERS = PUBLISHED.num_decoder_layers  # 3

# The published search: beam 10 (the searches' default), both directions, so each image
# decodes 20 rows, 10 per direction.
BEAM_SIZE = 10
DIRECTIONS = 2
ROWS_PER_IMAGE = DIRECTIONS * BEAM_SIZE
MAX_LEN = 200  # the searches' default longest expression; also the training target length bound

# Images (height, width in pixels) the benchmarks decode; the quick run takes the first.
IMAGE_SHAPES: Tuple[Tuple[int, int], ...] = ((128, 512), (256, 1024))
QUICK_IMAGE_SHAPES = IMAGE_SHAPES[:1]
QUICK_MAX_LEN = 60  # the quick run's max_len: a mid-length expression

TRAIN_BATCH = 16  # images per training batch
# Training feature maps the kernel report costs: 32x32 and 50x50 (2500 positions, not a multiple of 16).
TRAIN_FEATURE_MAPS: Tuple[Tuple[int, int], ...] = ((32, 32), (50, 50))


def feature_map(image: Tuple[int, int]) -> Tuple[int, int]:
    """The encoder's feature map (height, width) of an unpadded image of `image` pixels."""
    height, width = image
    if height % FEATURE_STRIDE or width % FEATURE_STRIDE:
        raise ValueError(f"image sides must be multiples of {FEATURE_STRIDE}, got {height}x{width}")
    return height // FEATURE_STRIDE, width // FEATURE_STRIDE


FEATURE_MAPS = tuple(feature_map(shape) for shape in IMAGE_SHAPES)  # (8, 32), (16, 64)
FEATURE_LENGTHS = tuple(h * w for h, w in FEATURE_MAPS)  # 256, 1024: the L of a decoding step
