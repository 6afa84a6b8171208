"""What every harness here shares: the split-independence check and the atheris entry."""

from __future__ import annotations

import sys
from collections.abc import Callable


def same_however_split(run: Callable[[list[bytes]], object], data: bytes, modulus: int) -> None:
    """Run the stream ``data[1:]`` whole and cut into ``data[0] % modulus + 1``-byte pieces;
    both must give the same result."""
    if not data:
        return
    step, stream = data[0] % modulus + 1, data[1:]
    whole = run([stream])
    split = run([stream[i : i + step] for i in range(0, len(stream), step)])
    assert whole == split, "chunking changed the result"


def atheris_main(check_one: Callable[[bytes], None]) -> None:  # pragma: no cover - atheris
    import atheris

    atheris.instrument_all()  # the code under test is already imported: instrument it all
    atheris.Setup(sys.argv, lambda data: check_one(bytes(data)))
    atheris.Fuzz()
