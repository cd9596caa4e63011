"""What a `fastcomer serve` worker needs to know: the model, the scheduler's bounds and the
limits of a request. The supervisor hands it to the workers it spawns through the environment."""
import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Optional

SETTINGS_ENV = "FASTCOMER_SERVE_SETTINGS"

# The media types of a raw image body (Pillow reads them, whatever the type says: it looks at the bytes).
IMAGE_TYPES = ("image/png", "image/jpeg", "image/jpg", "image/bmp", "image/x-ms-bmp", "image/gif", "image/tiff",
               "image/webp", "image/x-portable-graymap", "image/x-portable-pixmap", "application/octet-stream")


@dataclass(frozen=True)
class ServeSettings:
    """The knobs of `fastcomer serve` (docs/serve.md)."""

    checkpoint: str
    device: str = "cpu"
    max_batch: int = 8  # images decoding at once per worker (Scheduler's max_images)
    max_queue: int = 64  # requests' images waiting per worker; past it: 503
    timeout_s: float = 60.0  # a request's time from arrival to answer; past it: 504
    max_beam_size: int = 10
    max_len: int = 200  # the largest max_len a request may ask for, and its default
    beam_size: int = 10  # a request's default
    max_bytes: int = 10 * 2**20  # of a request's body; past it: 413
    max_pixels: int = 4096 * 4096  # of one image before scaling; past it: 413
    max_images: int = 16  # per multipart request; past it: 413
    batching: bool = True  # False: each request decoded alone by fastcomer.recognize (the load test's baseline)
    backend: Optional[str] = None
    graphs: Optional[bool] = None

    def to_environment(self) -> None:
        os.environ[SETTINGS_ENV] = json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_environment(cls) -> "ServeSettings":
        text = os.environ.get(SETTINGS_ENV)
        if not text:
            raise RuntimeError(f"{SETTINGS_ENV} is not set: start the service with `fastcomer serve`")
        return cls(**json.loads(text))
