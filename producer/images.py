"""Image bytes for frames: checking files before they are sent, and JPEG-encoding arrays.

The checks are the worker's own (`worker.frames`), run early so that a bad file is refused at
the station with a clear message rather than failing later as a job.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

from worker.frames import MAX_IMAGE_BYTES, FrameError, check_pixels, image_format

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def check_image(data: bytes) -> str:
    """'jpeg' or 'png' when `data` would be accepted by a worker; FrameError saying why not."""
    if not data:
        raise FrameError("file is empty (0 bytes)")
    if len(data) > MAX_IMAGE_BYTES:
        raise FrameError(f"image is {len(data)} bytes, over the limit of {MAX_IMAGE_BYTES} bytes (VQ_MAX_IMAGE_BYTES)")
    fmt = image_format(data)
    check_pixels(data)  # header only: catches truncated files and decompression bombs cheaply
    return fmt


def read_image_file(path: str | os.PathLike[str]) -> bytes:
    """The file's bytes if it is a JPEG or PNG a worker would take; FrameError otherwise."""
    st = Path(path).stat()
    if not stat.S_ISREG(st.st_mode):  # reading a FIFO would block until someone writes to it
        raise FrameError("not a regular file")
    size = st.st_size
    if size > MAX_IMAGE_BYTES:  # refuse before reading a huge file into memory
        raise FrameError(f"file is {size} bytes, over the limit of {MAX_IMAGE_BYTES} bytes (VQ_MAX_IMAGE_BYTES)")
    data = Path(path).read_bytes()
    check_image(data)
    return data


def encode_jpeg(image: Any, quality: int = 90) -> bytes:
    """JPEG bytes for an 8-bit image array in OpenCV's order: H×W (grey), H×W×3 BGR or H×W×4 BGRA.

    Arrays from OpenCV (`VideoCapture.read`, `imread`) are BGR already; convert RGB arrays
    (PIL, matplotlib, most ML code) first with `image[..., ::-1]`, or colours come out swapped.
    """
    import cv2  # lazy: importing the package must stay cheap for commands that never encode
    import numpy as np

    array = np.asarray(image)
    if array.dtype != np.uint8:
        raise ValueError(f"image must be uint8, got {array.dtype}")
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (1, 3, 4))):
        raise ValueError(f"image must be H×W, H×W×3 (BGR) or H×W×4 (BGRA), got shape {array.shape}")
    if not 0 <= quality <= 100:
        raise ValueError(f"jpeg quality must be 0..100, got {quality}")
    ok, buf = cv2.imencode(".jpg", array, [int(cv2.IMWRITE_JPEG_QUALITY), int(quality)])
    if not ok:
        raise ValueError(f"OpenCV could not JPEG-encode an image of shape {array.shape}")
    return buf.tobytes()
