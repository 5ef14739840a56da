"""The msgpack serializer for RQ: job data, meta and results travel as msgpack, never pickle."""

from __future__ import annotations

from typing import Any

import msgpack


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
        return msgpack.unpackb(data, raw=False, strict_map_key=False)
