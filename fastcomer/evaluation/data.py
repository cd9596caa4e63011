"""Evaluation data sets: captions and images in CoMER's layout, read without decoding anything.

Layouts (`open_dataset`):
- CoMER's `data.zip`: `data/<split>/caption.txt` and `data/<split>/img/<name>.bmp`;
- the same extracted as a folder (the folder holding `data/`, or `data/` itself);
- one split as a folder: `caption.txt` next to the images, or next to `img/`.
A caption line is `name tok tok ...` (whitespace-separated, as CoMER splits it). An image is
`<name>.bmp` (CoMER's), else `<name>` with another image suffix.
"""
import io
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Set, Tuple

from ..vocab import vocab

CAPTION_FILE = "caption.txt"
IMAGE_SUFFIXES = (".bmp", ".png", ".jpg", ".jpeg", ".gif", ".tif", ".tiff", ".webp", ".pgm", ".ppm")


class CaptionError(ValueError):
    """A caption file that does not parse (raised before any decoding)."""


@dataclass
class Sample:
    """One image of a split: its caption tokens and where its image is (None: missing)."""

    split: str
    name: str
    tokens: List[str]
    image: Optional[str]  # path inside the zip or on disk
    unknown: List[str] = field(default_factory=list)  # caption tokens outside CoMER's vocabulary


class Dataset:
    """The splits of one data set; `samples(split)` in caption-file order, `read(sample)` the
    image's bytes."""

    def __init__(self, source: str, splits: Dict[str, str], files: Set[str], archive: Optional[zipfile.ZipFile]):
        self.source = source
        self._splits = splits  # split -> its folder ("" for the root), inside the zip or on disk
        self._files = files  # every file's path, as `read` takes it
        self._archive = archive

    @property
    def splits(self) -> List[str]:
        return sorted(self._splits)

    def _caption_text(self, split: str) -> bytes:
        path = _join(self._splits[split], CAPTION_FILE)
        if self._archive is not None:
            return self._archive.read(path)
        return Path(path).read_bytes()

    def samples(self, split: str) -> List[Sample]:
        """The split's captions, each with its image path; CaptionError if the file does not parse."""
        if split not in self._splits:
            raise ValueError(f"{self.source}: no split {split!r}; it has {', '.join(self.splits) or 'none'}")
        where = f"{self.source}: {_join(self._splits[split], CAPTION_FILE)}"
        try:
            text = self._caption_text(split).decode("utf-8")
        except UnicodeDecodeError as err:
            raise CaptionError(f"{where}: not UTF-8 text (byte {err.start})") from None
        samples, seen = [], {}
        for number, line in enumerate(text.splitlines(), 1):
            parts = line.split()
            if not parts:
                continue
            name, tokens = parts[0], parts[1:]
            if not tokens:
                raise CaptionError(f"{where}, line {number}: {name!r} has no caption tokens (expected 'name tok tok ...')")
            if name in seen:
                raise CaptionError(f"{where}, line {number}: {name!r} already captioned on line {seen[name]}")
            seen[name] = number
            unknown = sorted({t for t in tokens if t not in vocab.word2idx})
            samples.append(Sample(split, name, tokens, self._image_path(split, name), unknown))
        if not samples:
            raise CaptionError(f"{where}: no captions")
        return samples

    def _image_path(self, split: str, name: str) -> Optional[str]:
        folder = self._splits[split]
        for images in (_join(folder, "img"), folder):
            for suffix in ("",) + IMAGE_SUFFIXES if Path(name).suffix.lower() in IMAGE_SUFFIXES else IMAGE_SUFFIXES:
                path = _join(images, name + suffix)
                if path in self._files:
                    return path
        return None

    def read(self, sample: Sample) -> bytes:
        if self._archive is not None:
            return self._archive.read(sample.image)
        return Path(sample.image).read_bytes()

    def close(self) -> None:
        if self._archive is not None:
            self._archive.close()


def _join(folder: str, name: str) -> str:
    return f"{folder}/{name}" if folder else name


def _layout(paths: Sequence[str], source: str) -> Dict[str, str]:
    """split -> folder, from the caption files among paths ('/'-separated, relative)."""
    captions = [p[: -len(CAPTION_FILE)].rstrip("/") for p in paths if p == CAPTION_FILE or p.endswith("/" + CAPTION_FILE)]
    comer = {c.split("/")[-1]: c for c in captions if c.count("/") == 1 and c.startswith("data/")}
    if comer:
        return comer
    nested = {c.split("/")[-1]: c for c in captions if c.count("/") == 0 and c}
    if nested:
        return nested  # data/ itself, extracted
    if "" in captions:
        return {Path(source).resolve().name or "data": ""}
    raise ValueError(f"{source}: no {CAPTION_FILE} found in CoMER's layout (data/<split>/{CAPTION_FILE}, "
                     f"<split>/{CAPTION_FILE}, or {CAPTION_FILE} next to the images)")


def open_dataset(source) -> Dataset:
    """A data set from a zip file or a folder (see the module docstring for the layouts)."""
    source = os.fspath(source)
    if os.path.isfile(source):
        try:
            archive = zipfile.ZipFile(source)
        except zipfile.BadZipFile:
            raise ValueError(f"{source}: not a zip file (expected CoMER's data.zip or a folder)") from None
        names = [n for n in archive.namelist() if not n.endswith("/")]
        return Dataset(source, _layout(names, source), set(names), archive)
    if not os.path.isdir(source):
        raise ValueError(f"{source}: no such file or folder")
    root = Path(source)
    relative = [p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and len(p.relative_to(root).parts) <= 4]
    splits = {split: (str(root / folder) if folder else str(root)) for split, folder in _layout(relative, source).items()}
    return Dataset(source, splits, {str(root / p) for p in relative}, None)


def read_pixels(data: bytes):
    """An image file's bytes -> a PIL image, fully loaded (a truncated file fails here)."""
    from ..recognize import _pil

    with _pil().open(io.BytesIO(data)) as opened:
        opened.load()
        return opened.copy()


def split_names(requested: Optional[Sequence[str]], dataset: Dataset) -> Tuple[str, ...]:
    """The splits to evaluate: those requested (each must exist), else every split but 'train'."""
    if requested:
        missing = [s for s in requested if s not in dataset.splits]
        if missing:
            raise ValueError(f"{dataset.source}: no split {', '.join(map(repr, missing))}; it has {', '.join(dataset.splits)}")
        return tuple(dict.fromkeys(requested))
    chosen = [s for s in dataset.splits if s != "train"] or dataset.splits
    return tuple(chosen)
