"""The one decoding error, ``fedpress.DecodeError``, and the rule that turns an
allocation failure while decoding into it. Internal to fedpress: the public surface
is ``fedpress.format``."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from .. import _core

__all__ = ["DecodeError"]

# Defined by the compiled module, so that the kernels that parse bytes (the index stream
# decoder) raise the same class as the Python reader.
DecodeError = _core.DecodeError
DecodeError.__doc__ = "A payload is malformed, truncated, corrupted or beyond the configured limits (a ValueError)."
DecodeError.__module__ = "fedpress"


@contextmanager
def out_of_memory_as_decode_error() -> Iterator[None]:
    """Reports a MemoryError inside the block as a DecodeError: a payload within the
    limits can still decode to more than this process can allocate, and a receiver
    handles one exception for every payload it cannot take (decode, inspect and
    Aggregator.add run under it)."""
    try:
        yield
    except MemoryError as exc:
        raise DecodeError(
            f"the payload's output could not be allocated ({exc or 'out of memory'}); "
            "smaller Limits refuse such payloads before allocating"
        ) from None
