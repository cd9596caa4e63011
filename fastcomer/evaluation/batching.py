"""Which images are decoded together: CoMER's test batches, or each image alone.

CoMER's test loop (its data module's `data_iterator`, eval batch size 4) orders a split's
images by pixel area (stable: ties keep caption order) and fills batches in that order: an
image joins the current batch unless the batch already holds 4 images or the batch would then
exceed 32e4 pixels counted as its largest image's area times its images; captions longer than
200 tokens and images over 32e4 pixels are left out. A batch is padded to its largest height
and width (zeros, mask True outside each image, at the top left), as `search.images.pad_images` does.
"""
from typing import Dict, List, Sequence, Tuple

BATCH_IMAGES = 4  # CoMER's eval_batch_size in its test script
MAX_PIXELS = 320_000  # CoMER's MAX_SIZE (32e4): per batch and per image
MAX_CAPTION = 200  # CoMER's maxlen: longer captions are left out

BATCHINGS = ("comer", "alone")


def check_batching(batching: str) -> None:
    if batching not in BATCHINGS:
        raise ValueError(f"batching must be one of {', '.join(map(repr, BATCHINGS))}, got {batching!r}")


def plan_batches(areas: Sequence[int], caption_lengths: Sequence[int], batching: str = "comer"
                 ) -> Tuple[List[List[int]], Dict[int, str]]:
    """(batches as lists of indices in decoding order, index -> why it is left out)."""
    check_batching(batching)
    order = sorted(range(len(areas)), key=lambda i: areas[i])
    batches: List[List[int]] = []
    left_out: Dict[int, str] = {}
    current: List[int] = []
    largest = 0
    for i in order:
        if caption_lengths[i] > MAX_CAPTION:
            left_out[i] = f"caption of {caption_lengths[i]} tokens, over CoMER's {MAX_CAPTION}"
            continue
        if areas[i] > MAX_PIXELS:
            left_out[i] = f"image of {areas[i]} pixels, over CoMER's {MAX_PIXELS}"
            continue
        largest = max(largest, areas[i])  # ascending order: the image just taken
        full = len(current) == (1 if batching == "alone" else BATCH_IMAGES)
        if current and (full or largest * (len(current) + 1) > MAX_PIXELS):
            batches.append(current)
            current, largest = [], areas[i]
        current.append(i)
    if current:
        batches.append(current)
    return batches, left_out
