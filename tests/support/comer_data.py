"""Data sets in CoMER's layout (data.zip: data/<split>/caption.txt, data/<split>/img/<name>.bmp), written by the tests."""
import io
import zipfile

from PIL import Image

from support.images import strokes

# (name, height, width, caption): sizes of several areas, one upscaled (height < 16); caption order != area order
SPLIT_2014 = [
    ("a", 24, 60, "x + 1"), ("b", 20, 40, "x"), ("c", 10, 30, "\\frac { 1 } { 2 }"), ("d", 32, 96, "a ^ { 2 }"),
    ("e", 20, 40, "y = x"), ("f", 28, 48, "1"),
]
SPLIT_2016 = [("g", 22, 50, "2 x"), ("h", 18, 36, "x - y")]


def bmp(height, width, seed):
    buffer = io.BytesIO()
    Image.fromarray(strokes(height, width, seed)).save(buffer, format="BMP")
    return buffer.getvalue()


def write_zip(path, splits, extra=()):
    """A data.zip in CoMER's layout; extra: (member, bytes) written as they are, instead of a member of that name."""
    replaced = {member for member, _ in extra}
    with zipfile.ZipFile(path, "w") as archive:
        for split, rows in splits.items():
            if f"data/{split}/caption.txt" not in replaced:
                archive.writestr(f"data/{split}/caption.txt", "".join(f"{n}\t{c}\n" for n, *_, c in rows))
            for seed, (name, height, width, _) in enumerate(rows):
                archive.writestr(f"data/{split}/img/{name}.bmp", bmp(height, width, seed))
        for member, data in extra:
            archive.writestr(member, data)
    return path
