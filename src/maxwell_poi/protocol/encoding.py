"""Digests and compact binary encodings shared by the prover and the verifier."""

from __future__ import annotations

import base64
import hashlib
import struct


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def unb64(text: str, what: str) -> bytes:
    """Strict base64 decode; raises ValueError naming the field on bad input."""
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (ValueError, UnicodeEncodeError) as exc:
        raise ValueError(f"{what} is not valid base64 ({exc})") from exc


def token_width(vocab_size: int) -> int:
    """Bytes per token id on the wire: 2 while the vocabulary fits in 16 bits."""
    return 2 if vocab_size <= 1 << 16 else 4


def pack_tokens(tokens: list[int], width: int) -> bytes:
    import numpy as np  # here, not at the top: reading a receipt needs no numpy

    dtype = "<u2" if width == 2 else "<u4"
    return np.asarray(tokens, dtype=dtype).tobytes()


def unpack_tokens(data: bytes, width: int) -> list[int]:
    if width not in (2, 4):
        raise ValueError(f"token width must be 2 or 4 bytes, got {width}")
    if len(data) % width:
        raise ValueError(f"token bytes ({len(data)}) are not a multiple of the width {width}")
    return list(struct.unpack(f"<{len(data) // width}{'H' if width == 2 else 'I'}", data))
