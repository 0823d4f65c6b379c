"""The vocabulary's bytes as one padded matrix (shared by the stop and JSON automata)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def token_matrix(vocab_bytes: Sequence[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """``(table uint8[V, L], lengths int32[V])``: token i's bytes, zero padded to the
    longest token L (at least 1).

    >>> token_matrix([b"a", b"bc", b""])[0].tolist()
    [[97, 0], [98, 99], [0, 0]]
    """
    lengths = np.fromiter((len(b) for b in vocab_bytes), np.int32, len(vocab_bytes))
    width = max(1, int(lengths.max(initial=0)))
    buf = np.frombuffer(b"".join(bytes(b).ljust(width, b"\0") for b in vocab_bytes), np.uint8)
    return buf.reshape(len(vocab_bytes), width), lengths
