"""What the two harnesses share: the command line, the default libFuzzer flags, the
instrumented import of the checks (tests/fuzz_checks.py), keep-going mode.

Options the harnesses take besides libFuzzer's own (removed before libFuzzer sees them):

    --findings=DIR   keep going after a finding: save the input as DIR/finding-<what>-<sha1>
                     (the first 3 inputs of each distinct signature), print it once, go on.
                     Without it the first finding raises, and libFuzzer writes crash-<sha1>
                     (see -artifact_prefix) and stops: the usual mode.
    --raw            (fuzz_payload.py, fuzz_frames.py) no structure-aware mutator: libFuzzer's
                     own byte mutations only.
"""

from __future__ import annotations

import collections
import gc
import os
import shlex
import sys
import types
from pathlib import Path
from typing import Any, Callable, Optional

ROOT = Path(__file__).resolve().parent.parent
TESTS = ROOT / "tests"

# libFuzzer flags the harnesses add unless the command line gives them: a small explicit
# memory cap (the checks also cap the address space, see tests/fuzz_checks.py), a hang
# limit, and inputs of a few KiB (the seeds are below 1 KiB).
DEFAULT_FLAGS = {"-rss_limit_mb": "2048", "-timeout": "10", "-max_len": "4096"}
PER_SIGNATURE = 3


def parse_argv(argv: list, extra_flags: Optional[dict] = None) -> tuple[list, dict]:
    """(libFuzzer argv with the default flags and ``extra_flags``, our options).

    Our options also go to the environment (FEDPRESS_FUZZ_FINDINGS, FEDPRESS_FUZZ_RAW) and
    argv[0] becomes "python script.py": libFuzzer runs ``-merge=1``, ``-fork`` and ``-jobs``
    work in child processes it starts from argv[0] (through the shell), with its own flags
    only."""
    rest = [" ".join(shlex.quote(a) for a in (sys.executable, str(Path(argv[0]).resolve())))]
    for arg in argv[1:]:
        if arg.startswith("--findings="):
            os.environ["FEDPRESS_FUZZ_FINDINGS"] = str(Path(arg.split("=", 1)[1]).resolve())
        elif arg == "--raw":
            os.environ["FEDPRESS_FUZZ_RAW"] = "1"
        else:
            rest.append(arg)
    findings = os.environ.get("FEDPRESS_FUZZ_FINDINGS")
    ours = {"findings": Path(findings) if findings else None, "raw": os.environ.get("FEDPRESS_FUZZ_RAW") == "1"}
    given = {a.split("=", 1)[0] for a in rest[1:] if a.startswith("-")}
    defaults = {**DEFAULT_FLAGS, **(extra_flags or {})}
    rest[1:1] = [f"{flag}={value}" for flag, value in defaults.items() if flag not in given]
    return rest, ours


def import_checks(atheris: Any) -> Any:
    """tests/fuzz_checks.py with fedpress (and the checks) instrumented for coverage.

    instrument_imports covers a regular install; an editable install (scikit-build-core's
    import hook, as in this repository's dev setup) loads fedpress through a custom
    loader that atheris does not instrument, so every fedpress function loaded after
    the import is instrumented too (instrument_func skips what already is)."""
    sys.path.insert(0, str(TESTS))
    with atheris.instrument_imports(include=["fedpress", "fuzz_checks"], enable_loader_override=False):
        import fuzz_checks
    import fedpress

    count = _instrument_loaded(atheris, ("fedpress", "fuzz_checks"))
    print(f"INFO: {count} fedpress functions instrumented", file=sys.stderr)
    fedpress.ops.set_num_threads(1)  # one core per fuzzer; determinism
    fuzz_checks.warm_up()
    return fuzz_checks


def _instrument_loaded(atheris: Any, packages: tuple) -> int:
    """instrument_func on every loaded Python function of ``packages``."""
    count = 0
    for obj in gc.get_objects():
        if not isinstance(obj, types.FunctionType):
            continue
        module = getattr(obj, "__module__", None) or ""
        if module.split(".")[0] not in packages or module not in sys.modules:
            continue
        if "__ATHERIS_INSTRUMENTED__" in obj.__code__.co_consts:
            continue
        try:
            atheris.instrument_func(obj)
            count += 1
        except Exception as exc:  # noqa: BLE001 - a function atheris cannot patch stays uncovered
            print(f"WARNING: {obj.__qualname__} not instrumented: {exc}", file=sys.stderr)
    return count


def target(check: Callable[[bytes], None], checks: Any, findings: Optional[Path]) -> Callable[[bytes], None]:
    """The TestOneInput function: check(data); a Finding raises (libFuzzer saves the
    crash input) unless keep-going mode saves it and continues."""
    if findings is None:
        return check
    findings.mkdir(parents=True, exist_ok=True)
    seen: collections.Counter = collections.Counter()

    def one(data: bytes) -> None:
        try:
            check(data)
        except checks.Finding as exc:
            seen[exc.signature] += 1
            if seen[exc.signature] <= PER_SIGNATURE:
                path = findings / checks.finding_name(data, exc)
                path.write_bytes(data)
                if seen[exc.signature] == 1:
                    print(
                        f"\n#FINDING {exc.signature}\n  {str(exc)[:300]}\n  saved {path}", file=sys.stderr, flush=True
                    )

    return one
