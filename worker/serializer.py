"""The msgpack serializer for RQ: job data, meta and results travel as msgpack, never pickle."""

from __future__ import annotations

from typing import Any

import msgpack

from .frames import MAX_IMAGE_BYTES

# Bounds checked while unpacking, before anything is allocated: a frame holds one image of at most
# VQ_MAX_IMAGE_BYTES and a handful of short fields, a result a few dozen. Nothing we write comes
# near these; a crafted message that declares a huge container fails at once.
MAX_STR = 1024 * 1024
MAX_CONTAINER = 4096


class MsgpackSerializer:
    """An RQ serializer (`dumps`/`loads`) over msgpack.

    RQ hands it the job data tuple, `meta` and results. Tuples come back as lists, which RQ
    unpacks the same way. `strict_map_key=False` so that a `meta` with integer keys round-trips.
    """

    @staticmethod
    def dumps(obj: Any) -> bytes:
        return msgpack.packb(obj, use_bin_type=True)

    @staticmethod
    def loads(data: bytes) -> Any:
        return msgpack.unpackb(data, raw=False, strict_map_key=False, max_bin_len=MAX_IMAGE_BYTES,
                               max_str_len=MAX_STR, max_array_len=MAX_CONTAINER, max_map_len=MAX_CONTAINER,
                               max_ext_len=0)
