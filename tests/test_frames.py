import msgpack
import pytest
from helpers import jpeg, png

from worker.frames import FrameError, check_pixels, image_size, make_frame, validate_frame
from worker.serializer import MsgpackSerializer


def test_make_frame_round_trips_through_msgpack():
    frame = make_frame(jpeg(), station="line-3", seq=7, meta={"deadline_s": 2, 1: "int key"})
    back = MsgpackSerializer.loads(MsgpackSerializer.dumps(frame))
    assert back == frame
    assert set(back) == {"v", "id", "station", "ts", "seq", "image", "meta"}


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda f: f.update(v=2), "version 2"),
        (lambda f: f.pop("id"), "missing id"),
        (lambda f: f.update(station=""), "station"),
        (lambda f: f.update(ts="yesterday"), "ts must be"),
        (lambda f: f.update(image=b""), "empty"),
        (lambda f: f.update(image=b"GIF89a....."), "neither JPEG nor PNG"),
        (lambda f: f.update(meta=[1]), "meta must be a map"),
    ],
)
def test_validate_frame_names_what_is_wrong(mutate, message):
    frame = make_frame(jpeg())
    mutate(frame)
    with pytest.raises(FrameError, match=message):
        validate_frame(frame)


def test_encoded_size_limit_names_the_limit():
    frame = make_frame(jpeg())
    with pytest.raises(FrameError, match="VQ_MAX_IMAGE_BYTES"):
        validate_frame(frame, max_image_bytes=100)


def test_header_sizes_without_decoding():
    assert image_size(jpeg(64, 48)) == (64, 48)
    assert image_size(png(40, 30)) == (40, 30)


def test_decompression_bomb_refused_from_header():
    # A PNG header claiming 100000 x 100000 pixels: refused before any allocation.
    data = bytearray(png(8, 8))
    data[16:20] = (100_000).to_bytes(4, "big")
    data[20:24] = (100_000).to_bytes(4, "big")
    with pytest.raises(FrameError, match="VQ_MAX_PIXELS"):
        check_pixels(bytes(data))


def _scan_bomb(copies: int) -> tuple[bytes, bytes]:
    """A real progressive JPEG, and the same with one of its later scans (with the tables before it)
    repeated `copies` times: still a legal image, decoded one pass over every block per scan."""
    import cv2
    import numpy as np

    image = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    data = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])[1].tobytes()
    i, segments, start = 2, [], None
    while data[i + 1] != 0xD9:
        marker, length = data[i + 1], int.from_bytes(data[i + 2:i + 4], "big")
        if start is None and marker in (0xC4, 0xDA):
            start = i
        if marker != 0xDA:
            i += 2 + length
            continue
        j = i + 2 + length  # the entropy-coded data runs to the next marker that is not a stuffed 0xFF
        while not (data[j] == 0xFF and data[j + 1] != 0x00 and not 0xD0 <= data[j + 1] <= 0xD7):
            j += 1
        segments.append(data[start:j])
        start, i = None, j
    return data, data[:-2] + segments[-1] * copies + b"\xff\xd9"


def test_a_progressive_jpeg_scan_bomb_is_refused_from_its_markers():
    real, bomb = _scan_bomb(600)
    assert check_pixels(real) == (64, 64)  # a real progressive JPEG (about ten scans) passes
    with pytest.raises(FrameError, match="scans, over the limit of 500"):
        check_pixels(bomb)


def test_truncated_jpeg_header():
    with pytest.raises(FrameError, match="truncated"):
        image_size(jpeg()[:20])


def test_msgpack_serializer_is_not_pickle():
    assert msgpack.unpackb(MsgpackSerializer.dumps({"a": b"x"})) == {"a": b"x"}
