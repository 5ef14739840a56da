"""Frame message v1: the contract between producers and workers.

A frame is a msgpack map with `v, id, station, ts, seq, image, meta`; `image` holds the encoded
JPEG or PNG bytes. Producers build frames with `make_frame`, workers check them with
`validate_frame` before decoding; both sides enforce the same limits.
"""

from __future__ import annotations

import math
import re
import time
import uuid
from typing import Any

from .settings import frame_limits

FRAME_VERSION = 1
FRAME_KEYS = ("v", "id", "station", "ts", "seq", "image", "meta")

# Read once at import: the serializer and the job class size their limits from these constants.
_LIMITS = frame_limits()
MAX_IMAGE_BYTES = _LIMITS.max_image_bytes
MAX_PIXELS = _LIMITS.max_pixels
MAX_STATION_LEN = 128
MAX_JPEG_SCANS = 500
MAX_META_KEYS = 64
MAX_META_DEPTH = 8
MAX_DEADLINE_S = 86_400.0
MAX_TS = 4_102_444_800.0  # 2100-01-01: a capture time past this is a unit mistake (ms, ns), not a clock
# The id is the RQ job id, so RQ's alphabet (rq.job.JOB_ID_PATTERN: letters, digits, '_', '-'): RQ
# refuses anything else at enqueue, and joins ids with ':' into execution keys.
_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,127}")
MAX_ID_LEN = 128
# What a worker takes off its queue: RQ's alphabet, any job RQ could have made (a plain RQ job fails
# alone, as not a frame); ours above is stricter. The length bound only stops a planted giant.
_RQ_ID_RE = re.compile(r"[A-Za-z0-9_-]+")
MAX_QUEUE_ID_LEN = 1024

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
    _check_packable(frame["meta"])
    return frame


def _check_packable(meta: dict[str, Any]) -> None:
    """A meta value msgpack cannot carry (a set, a datetime, an object) fails here, naming its key,
    rather than as a bare TypeError at submit time, taking the frames sent with it along."""
    import msgpack  # a producer dependency already (the job serializer); imported late, like the rest

    for key, value in meta.items():
        try:
            msgpack.packb(value, use_bin_type=True)
        except (TypeError, ValueError, OverflowError) as exc:
            raise FrameError(f"meta[{_show(key)}] cannot be sent as msgpack: {exc}") from None


def validate_frame(frame: Any, *, max_image_bytes: int = MAX_IMAGE_BYTES) -> dict[str, Any]:
    """Check the type and range of every field of a frame message; FrameError naming the first thing wrong."""
    if not isinstance(frame, dict):
        raise FrameError(f"frame must be a map, got {type(frame).__name__}")
    missing = [k for k in FRAME_KEYS if k not in frame and k != "meta"]
    if missing:
        raise FrameError(f"frame is missing {', '.join(missing)}")
    unknown = [str(k)[:32] for k in frame if k not in FRAME_KEYS]
    if unknown:
        raise FrameError(f"frame has unknown fields: {', '.join(sorted(unknown)[:5])}")
    if type(frame["v"]) is not int or frame["v"] != FRAME_VERSION:
        raise FrameError(f"frame version {_show(frame['v'])} is not supported (this worker reads v{FRAME_VERSION})")
    check_frame_id(frame["id"])
    check_station(frame["station"])
    _check_number("ts", frame["ts"], 0.0, MAX_TS, "unix seconds")
    seq = frame["seq"]
    if type(seq) is not int or not 0 <= seq < 2**63:
        raise FrameError(f"seq {_show(seq)} is not an integer in [0, 2^63)")
    meta = frame.get("meta")
    if meta is not None:
        if not isinstance(meta, dict):
            raise FrameError(f"meta must be a map, got {type(meta).__name__}")
        if len(meta) > MAX_META_KEYS:
            raise FrameError(f"meta has {len(meta)} keys, over the limit of {MAX_META_KEYS}")
        if not all(isinstance(k, str | int) for k in meta):
            raise FrameError("meta keys must be strings or integers")
        if _depth(meta) > MAX_META_DEPTH:
            raise FrameError(f"meta is nested more than {MAX_META_DEPTH} levels deep")
        if meta.get("deadline_s") is not None:
            check_deadline(meta["deadline_s"], "meta.deadline_s")
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


def check_frame_id(frame_id: Any) -> str:
    """`frame_id` when it is a valid frame id (it names the RQ job, a stored sample, an exported file);
    FrameError otherwise."""
    if not isinstance(frame_id, str) or not _ID_RE.fullmatch(frame_id):
        raise FrameError(f"frame id {_show(frame_id)} is not 1..{MAX_ID_LEN} letters, digits, '_' or '-' "
                         "(starting with a letter or digit)")
    return frame_id


def job_id_text(raw: bytes | str) -> str | None:
    """`raw` (a queue entry, a registry member's id part) as a job id a worker can serve, or None when
    it can be none: not UTF-8, or outside RQ's alphabet. Only a planted entry is like that."""
    try:
        text = raw.decode() if isinstance(raw, bytes) else raw
    except UnicodeDecodeError:
        return None
    return text if len(text) <= MAX_QUEUE_ID_LEN and _RQ_ID_RE.fullmatch(text) else None


def check_station(station: Any) -> str:
    """`station` when it is a valid station name (producers check theirs once, at start); FrameError else."""
    if not isinstance(station, str) or not 0 < len(station) <= MAX_STATION_LEN or not station.isprintable():
        raise FrameError(f"station {_show(station)} is not a printable string of 1..{MAX_STATION_LEN} characters")
    return station


def check_deadline(seconds: Any, name: str = "deadline_s") -> float:
    """`seconds` as a float when it is a valid frame deadline, (0, MAX_DEADLINE_S]; FrameError else."""
    _check_number(name, seconds, 0.0, MAX_DEADLINE_S, "seconds", positive=True)
    return float(seconds)


def _depth(value: Any, limit: int = MAX_META_DEPTH + 1) -> int:
    """Nesting depth of maps and lists, counted no further than `limit`."""
    if limit <= 0 or not isinstance(value, dict | list):
        return 0
    children = value.values() if isinstance(value, dict) else value
    return 1 + max((_depth(c, limit - 1) for c in children), default=0)


def _check_number(name: str, value: Any, lo: float, hi: float, unit: str, positive: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise FrameError(f"{name} must be a number ({unit}), got {_show(value)}")
    if not math.isfinite(value) or not lo <= value <= hi or (positive and value <= 0):
        bound = f"({lo:g}, {hi:g}]" if positive else f"[{lo:g}, {hi:g}]"
        raise FrameError(f"{name}={value!r} is not a finite number in {bound} {unit}")


def _show(value: Any) -> str:
    """A short, safe rendering of a bad value for an error message."""
    text = repr(value)
    if len(text) <= 40:
        return text
    size = f" of length {len(value)}" if hasattr(value, "__len__") else ""
    return f"{text[:37]}... ({type(value).__name__}{size})"


def frame_deadline(frame: dict[str, Any]) -> float | None:
    """The unix time after which the frame is stale, if its producer set `meta.deadline_s`."""
    deadline_s = (frame.get("meta") or {}).get("deadline_s")
    return None if deadline_s is None else frame["ts"] + deadline_s


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
    if data.startswith(_JPEG_MAGIC):
        # A progressive JPEG decodes scan by scan, each pass over the whole image: a few KB of tiny scans
        # repeated tens of thousands of times keep a decoder busy for minutes inside both limits above
        # (a "scan bomb"; libjpeg-turbo's TurboJPEG API bounds it with TJPARAM_SCANLIMIT, OpenCV does
        # not). SOS markers cannot occur inside entropy-coded data (0xFF is stuffed there), so counting
        # them is exact, give or take an EXIF thumbnail's few. Real encoders write at most a few dozen.
        scans = data.count(b"\xff\xda")
        if scans > MAX_JPEG_SCANS:
            raise FrameError(f"JPEG has {scans} scans, over the limit of {MAX_JPEG_SCANS} (a progressive scan bomb)")
    return width, height
