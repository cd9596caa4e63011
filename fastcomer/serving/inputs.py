"""A recognition request's inputs, checked: its search settings (query parameters), its body
(a raw image or multipart/form-data) and its images. Every fault is a `Problem`: an HTTP 4xx
status with a message naming it."""
import io
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Tuple

from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException
from starlette.requests import Request

from .settings import IMAGE_TYPES, ServeSettings


@dataclass(eq=False)
class Problem(Exception):
    """An HTTP error answer: status, message (the JSON body's "error") and headers."""

    status: int
    message: str
    headers: Dict[str, str] = field(default_factory=dict)


def _integer(query: Mapping[str, str], name: str, default: int, low: int, high: int) -> int:
    text = query.get(name)
    if text is None:
        return default
    try:
        value = int(text)
    except ValueError:
        raise Problem(422, f"{name} must be an integer, got {text!r}") from None
    if not low <= value <= high:
        raise Problem(422, f"{name} must be in {low}..{high}, got {value}")
    return value


def search_settings(query: Mapping[str, str], settings: ServeSettings) -> Tuple[int, int]:
    """(beam_size, max_len) from the query parameters, within the server's limits."""
    unknown = sorted(set(query) - {"beam_size", "max_len"})
    if unknown:
        raise Problem(422, f"unknown query parameter(s) {', '.join(unknown)}: expected beam_size, max_len")
    return (_integer(query, "beam_size", settings.beam_size, 1, settings.max_beam_size),
            _integer(query, "max_len", settings.max_len, 2, settings.max_len))


def media_type(content_type: str) -> str:
    return content_type.split(";", 1)[0].strip().lower()


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The whole body, or 413 as soon as it is longer than max_bytes (by its Content-Length or
    as it streams in)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise Problem(413, f"the body has {declared} bytes, more than the server's limit of {max_bytes}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise Problem(413, f"the body has more than the server's limit of {max_bytes} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def image_bodies(request: Request, settings: ServeSettings) -> Tuple[List[bytes], bool]:
    """The images' bytes, and whether the request sent several (multipart: answered with a list)."""
    kind = media_type(request.headers.get("content-type", ""))
    if kind != "multipart/form-data" and kind not in IMAGE_TYPES:
        raise Problem(415, f"unsupported Content-Type {kind or '(none)'!r}: send an image as the body "
                           f"(image/png, image/jpeg, image/bmp, ...) or images as multipart/form-data")
    body = await read_body(request, settings.max_bytes)
    if kind != "multipart/form-data":
        return [body], False
    replayed = Request(request.scope, _replay(body))
    try:
        # one more than allowed, so that too many images are told apart (413) from a malformed body
        form = await replayed.form(max_files=settings.max_images + 1, max_fields=settings.max_images + 1)
    except MultiPartException as err:
        raise Problem(400, f"malformed multipart body: {err}") from None
    if len(form.multi_items()) > settings.max_images:
        await form.close()
        raise Problem(413, f"more than the server's limit of {settings.max_images} images per request")
    images = []
    for name, value in form.multi_items():
        if not isinstance(value, UploadFile):
            raise Problem(422, f"unexpected form field {name!r}: send images as file parts")
        part_type = media_type(value.content_type or "application/octet-stream")
        if part_type not in IMAGE_TYPES:
            raise Problem(415, f"part {name!r}: unsupported Content-Type {part_type!r}")
        images.append(await value.read())
    await form.close()
    if not images:
        raise Problem(400, "the multipart body holds no image")
    return images, True


def _replay(body: bytes):
    """An ASGI receive that gives `body` once (the body was read already, within its limit)."""
    sent = False

    async def receive():
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}
    return receive


def open_image(data: bytes, index: int, max_pixels: int):
    """The image in `data` as a PIL image, decoded (`fastcomer.recognize.read_image_file`): 400
    when it cannot be, 413 when it has more than max_pixels pixels (checked before its pixels
    are decoded)."""
    from ..recognize import ImageError, ImageTooLarge, read_image_file

    try:
        return read_image_file(io.BytesIO(data), max_pixels)
    except ImageTooLarge as err:
        raise Problem(413, f"image {index}: {err} (the server's limit)") from None
    except ImageError as err:
        raise Problem(400, f"image {index}: {err}") from None
