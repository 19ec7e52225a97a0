"""Replays the fuzz corpus (fuzz/corpus/payload, fuzz/corpus/frames: the seeds of
fuzz/make_seeds.py and every crash or new-coverage input the fuzzers found) through
the harnesses' own checks (tests/fuzz_checks.py), without atheris: each file must
decode or be refused with the allowed exception (DecodeError; ProtocolError), within
the memory cap and promptly. A finding fixed once stays fixed.

See fuzz/README.md for running the fuzzers and adding findings to the corpus.
"""

from __future__ import annotations

import time

import pytest
from fuzz_checks import (
    CORPUS,
    FRAMES_CORPUS,
    PAYLOAD_CORPUS,
    Finding,
    FrameChecker,
    check_payload,
    corpus_files,
)

SLOW = 10.0  # seconds per file: generous (a check runs every entry point), a hang still shows

PAYLOAD_FILES = corpus_files(PAYLOAD_CORPUS)
FRAME_FILES = corpus_files(FRAMES_CORPUS)

needs_corpus = pytest.mark.skipif(not CORPUS.is_dir(), reason=f"no fuzz corpus at {CORPUS} (not a source checkout)")


def _ids(files: list) -> list:
    return [p.name for p in files]


@pytest.fixture(scope="module")
def frame_checker():
    with FrameChecker() as checker:
        yield checker


def _replay(check, path) -> None:
    data = path.read_bytes()
    start = time.perf_counter()
    try:
        check(data)
    except Finding as exc:
        pytest.fail(f"{path.relative_to(CORPUS.parent.parent)}: {exc}", pytrace=False)
    elapsed = time.perf_counter() - start
    assert elapsed < SLOW, f"{path.name}: took {elapsed:.2f} s"


@needs_corpus
def test_corpus_is_there() -> None:
    """The corpus holds the seeds of both harnesses (an empty glob would pass vacuously)."""
    assert any(p.name.startswith("seed-") for p in PAYLOAD_FILES), PAYLOAD_CORPUS
    assert any(p.name.startswith("seed-") for p in FRAME_FILES), FRAMES_CORPUS
    total = sum(p.stat().st_size for p in PAYLOAD_FILES + FRAME_FILES)
    assert total < 1 << 20, f"the corpus has grown to {total} bytes: minimize it (fuzz/README.md)"


@needs_corpus
@pytest.mark.parametrize("path", PAYLOAD_FILES, ids=_ids(PAYLOAD_FILES))
def test_payload_corpus(path) -> None:
    _replay(check_payload, path)


@needs_corpus
@pytest.mark.parametrize("path", FRAME_FILES, ids=_ids(FRAME_FILES))
def test_frames_corpus(path, frame_checker) -> None:
    _replay(frame_checker.check, path)
