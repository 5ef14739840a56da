"""Frame message v1: the contract between producers and workers.

A frame is a msgpack map with `v, id, station, ts, seq, image, meta`; `image` holds the encoded
JPEG or PNG bytes. Producers build frames with `make_frame`, workers check them with
`validate_frame` before decoding; both sides enforce the same limits.
"""

from __future__ import annotations

import os
import time
import uuid
from typing import Any

FRAME_VERSION = 1
FRAME_KEYS = ("v", "id", "station", "ts", "seq", "image", "meta")

MAX_IMAGE_BYTES = int(os.environ.get("VQ_MAX_IMAGE_BYTES", 16 * 1024 * 1024))
MAX_PIXELS = int(os.environ.get("VQ_MAX_PIXELS", 40_000_000))
MAX_STATION_LEN = 128

_JPEG_MAGIC = b"\xff\xd8\xff"
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class FrameError(ValueError):
    """A frame that cannot be classified: bad message, corrupt or oversized image.

    It fails the frame's own job and nothing else.
    """


def image_format(data: bytes) -> str:
    """`'jpeg'` or `'png'` from the magic bytes; FrameError for anything else."""
    if data.startswith(_JPEG_MAGIC):
        return "jpeg"
    if data.startswith(_PNG_MAGIC):
        return "png"
    head = data[:8].hex() if data else "nothing"
    raise FrameError(f"image is neither JPEG nor PNG (starts with {head})")


def make_frame(
    image: bytes,
    *,
    station: str = "default",
    seq: int = 0,
    ts: float | None = None,
    frame_id: str | None = None,
    meta: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Build and validate a v1 frame around already-encoded image bytes."""
    frame = {
        "v": FRAME_VERSION,
        "id": frame_id or uuid.uuid4().hex,
        "station": station,
        "ts": time.time() if ts is None else float(ts),
        "seq": int(seq),
        "image": bytes(image),
        "meta": dict(meta or {}),
    }
    validate_frame(frame)
    return frame


def validate_frame(frame: Any, *, max_image_bytes: int = MAX_IMAGE_BYTES) -> dict[str, Any]:
    """Check the shape of a frame message; FrameError naming the first thing wrong."""
    if not isinstance(frame, dict):
        raise FrameError(f"frame must be a map, got {type(frame).__name__}")
    missing = [k for k in FRAME_KEYS if k not in frame and k != "meta"]
    if missing:
        raise FrameError(f"frame is missing {', '.join(missing)}")
    if frame["v"] != FRAME_VERSION:
        raise FrameError(f"frame version {frame['v']!r} is not supported (this worker reads v{FRAME_VERSION})")
    if not isinstance(frame["id"], str) or not frame["id"]:
        raise FrameError("frame id must be a non-empty string")
    if not isinstance(frame["station"], str) or not 0 < len(frame["station"]) <= MAX_STATION_LEN:
        raise FrameError(f"station must be a string of 1..{MAX_STATION_LEN} characters")
    if not isinstance(frame["ts"], int | float) or isinstance(frame["ts"], bool):
        raise FrameError("ts must be unix seconds (a number)")
    if not isinstance(frame["seq"], int) or isinstance(frame["seq"], bool):
        raise FrameError("seq must be an integer")
    meta = frame.get("meta")
    if meta is not None and not isinstance(meta, dict):
        raise FrameError("meta must be a map")
    image = frame["image"]
    if not isinstance(image, bytes | bytearray):
        raise FrameError(f"image must be bytes, got {type(image).__name__}")
    if not image:
        raise FrameError("image is empty (0 bytes)")
    if len(image) > max_image_bytes:
        raise FrameError(
            f"image is {len(image)} bytes, over the limit of {max_image_bytes} bytes (VQ_MAX_IMAGE_BYTES)"
        )
    image_format(image)
    return frame


def frame_deadline(frame: dict[str, Any]) -> float | None:
    """The unix time after which the frame is stale, if its producer set `meta.deadline_s`."""
    meta = frame.get("meta") or {}
    deadline_s = meta.get("deadline_s")
    if deadline_s is None:
        return None
    return float(frame["ts"]) + float(deadline_s)


def image_size(data: bytes) -> tuple[int, int]:
    """(width, height) read from the JPEG or PNG header, without decoding pixels.

    Lets the worker refuse a decompression bomb before it allocates anything.
    """
    fmt = image_format(data)
    if fmt == "png":
        if len(data) < 24 or data[12:16] != b"IHDR":
            raise FrameError("PNG is truncated before its IHDR header")
        return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    # JPEG: walk the markers up to the first start-of-frame (SOF0..SOF15 except DHT/JPG/DAC).
    i = 2
    n = len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            raise FrameError(f"JPEG is corrupt: expected a marker at byte {i}")
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            i += 2
            continue
        length = int.from_bytes(data[i + 2 : i + 4], "big")
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            if i + 9 > n:
                break
            height = int.from_bytes(data[i + 5 : i + 7], "big")
            width = int.from_bytes(data[i + 7 : i + 9], "big")
            return width, height
        i += 2 + length
    raise FrameError("JPEG is truncated before its frame header (no SOF marker)")


def check_pixels(data: bytes, max_pixels: int = MAX_PIXELS) -> tuple[int, int]:
    """The image's size, or FrameError when it is empty or larger than `max_pixels`."""
    width, height = image_size(data)
    if width <= 0 or height <= 0:
        raise FrameError(f"image header says {width}x{height} pixels")
    if width * height > max_pixels:
        raise FrameError(
            f"image is {width}x{height} = {width * height} pixels, over the limit of {max_pixels} (VQ_MAX_PIXELS)"
        )
    return width, height
