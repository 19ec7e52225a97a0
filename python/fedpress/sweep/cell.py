"""A sweep cell: an uplink spec and the options of the algorithms around it.

``SPEC[@key=value,...]``, e.g. ``topk:0.001+q4+zstd@momentum=0.9,downlink=topk:0.05+q8+zstd``.
Each option is one thing a client or the server does besides the codec;
``OPTIONS`` lists them with their meaning. ``str(cell)`` is canonical (the
spec in canonical form, then the options that differ from their defaults in
a fixed order), so two spellings of one cell are one cell.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Optional

from ..codec import parse_spec

__all__ = ["Cell", "parse_cell", "OPTIONS"]

#: option -> what it does (the CLI's help lists these).
OPTIONS = {
    "ef": "on|off: client error feedback (default on)",
    "momentum": "client momentum correction with momentum-factor masking (DGC), beta in [0, 1)",
    "clip": "local clipping: the largest L2 norm of a client's update before it is compressed",
    "warmup": "rounds of DGC density warm-up (the kept fraction falls geometrically to the spec's)",
    "warmup_start": "the kept fraction in round 1 of the warm-up (default 0.25)",
    "server_momentum": "server momentum (FedAvgM), beta in [0, 1)",
    "server_lr": "server learning rate applied to the mean update (default 1)",
    "server_decay": "the server lr falls along a half cosine to this fraction of itself in the last round",
    "downlink": "SPEC: compressed downlink deltas with server-side error feedback",
    "downlink_mode": "chain|client: a client catches up with every delta it missed (chain, default), or receives "
    "one compressed difference from the model the server keeps for it (client)",
    "table": "inline|digest: payloads carry the tensor table, or only its 8-byte digest",
    "secagg": "on|off: secure aggregation (an intB spec): clients mask their codes, the server sees only the sum, "
    "the protocol's messages count in the bytes; every update weighs the same",
    "dp": "Z: differential privacy with noise multiplier Z over clip (needed): Gaussian noise on the server's sum, "
    "or Skellam noise the clients add under secagg; rows carry epsilon (delta 1e-5)",
}


@dataclass(frozen=True)
class Cell:
    """One configuration of a sweep (see the module doc for the text form)."""

    spec: str
    ef: bool = True
    momentum: Optional[float] = None
    clip: Optional[float] = None
    warmup: int = 0
    warmup_start: float = 0.25
    server_momentum: float = 0.0
    server_lr: float = 1.0
    server_decay: Optional[float] = None
    downlink: Optional[str] = None
    downlink_mode: str = "chain"
    table: str = "inline"
    secagg: bool = False
    dp: Optional[float] = None

    def __str__(self) -> str:
        parts = []
        for f in fields(self):
            if f.name == "spec":
                continue
            value = getattr(self, f.name)
            if value == f.default:
                continue
            if isinstance(value, bool):
                value = "on" if value else "off"
            parts.append(f"{f.name}={value}")
        return self.spec + ("@" + ",".join(parts) if parts else "")

    @property
    def is_baseline(self) -> bool:
        """The uncompressed reference: fp32 both ways, nothing else."""
        return str(self) == "fp32"

    def encoder_options(self) -> dict[str, Any]:
        """Keyword arguments of ``fedpress.Encoder`` for this cell's clients."""
        opts: dict[str, Any] = {
            "error_feedback": self.ef,
            "momentum": self.momentum,
            "clip": self.clip,
            "warmup_rounds": self.warmup,
            "warmup_start": self.warmup_start,
        }
        if self.table != "inline":
            opts["table"] = self.table
        return opts


def _number(cell: str, key: str, text: str, low: float, high: float, *, closed_high: bool = False) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    ok = math.isfinite(value) and low <= value and (value <= high if closed_high else value < high)
    if not ok:
        bound = f"[{low}, {high}]" if closed_high else f"[{low}, {high})"
        raise ValueError(f"cell {cell!r}: {key}={text!r} must be a number in {bound}")
    return value


def parse_cell(text: str) -> Cell:
    """Parses ``SPEC[@key=value,...]``; a bad cell raises ValueError naming the part."""
    if not isinstance(text, str):
        raise TypeError(f"a cell must be a string, got {type(text).__name__}")
    raw = text.strip()
    spec_text, at, opts_text = raw.partition("@")
    try:
        spec = str(parse_spec(spec_text))
    except ValueError as exc:
        raise ValueError(f"cell {raw!r}: {exc}") from None
    values: dict[str, Any] = {"spec": spec}
    if at and not opts_text.strip():
        raise ValueError(f"cell {raw!r}: nothing after '@'; expected key=value options ({', '.join(OPTIONS)})")
    for item in opts_text.split(",") if at else []:
        key, eq, value = (part.strip() for part in item.partition("="))
        key = key.lower()
        if key not in OPTIONS:
            raise ValueError(f"cell {raw!r}: unknown option {key!r}; known: {', '.join(OPTIONS)}")
        if not eq or not value:
            raise ValueError(f"cell {raw!r}: option {key!r} needs a value ({key}=...)")
        if key in values:
            raise ValueError(f"cell {raw!r}: option {key!r} given twice")
        if key in ("ef", "secagg"):
            if value.lower() not in ("on", "off"):
                raise ValueError(f"cell {raw!r}: {key} must be on or off, got {value!r}")
            values[key] = value.lower() == "on"
        elif key == "dp":
            values[key] = _number(raw, key, value, 1e-6, 1e6)
        elif key in ("momentum", "server_momentum"):
            values[key] = _number(raw, key, value, 0.0, 1.0)
        elif key == "clip":
            values[key] = _number(raw, key, value, 0.0, math.inf)
            if values[key] == 0.0:
                raise ValueError(f"cell {raw!r}: clip must be positive")
        elif key == "warmup":
            if not value.isdigit():
                raise ValueError(f"cell {raw!r}: warmup must be a whole number of rounds, got {value!r}")
            values[key] = int(value)
        elif key == "warmup_start":
            values[key] = _number(raw, key, value, 1e-9, 1.0, closed_high=True)
        elif key == "server_lr":
            values[key] = _number(raw, key, value, 1e-9, 1e3, closed_high=True)
        elif key == "server_decay":
            values[key] = _number(raw, key, value, 0.0, 1.0, closed_high=True)
        elif key == "downlink":
            try:
                values[key] = str(parse_spec(value))
            except ValueError as exc:
                raise ValueError(f"cell {raw!r}: downlink: {exc}") from None
        elif key == "downlink_mode":
            if value.lower() not in ("chain", "client"):
                raise ValueError(f"cell {raw!r}: downlink_mode must be chain or client, got {value!r}")
            values[key] = value.lower()
        elif key == "table":
            if value.lower() not in ("inline", "digest"):
                raise ValueError(f"cell {raw!r}: table must be inline or digest, got {value!r}")
            values[key] = value.lower()
    if values.get("warmup") and parse_spec(spec).sparsifier is None:
        raise ValueError(f"cell {raw!r}: warmup needs a sparsifier in the spec (topk/thresh/randk)")
    if values.get("downlink") and parse_spec(values["downlink"]).eden_mode == "shared":
        raise ValueError(f"cell {raw!r}: downlink cannot use a shared-rotation eden mode")
    if values.get("downlink_mode") == "client" and not values.get("downlink"):
        raise ValueError(f"cell {raw!r}: downlink_mode=client needs downlink=SPEC (the codec of the differences)")
    if values.get("momentum") == 0.0:
        values["momentum"] = None
    if values.get("dp") is not None and values.get("clip") is None:
        raise ValueError(f"cell {raw!r}: dp needs clip=C (each client's update is scaled to at most C)")
    if values.get("secagg"):
        sp = parse_spec(spec)
        if not sp.int_bits or sp.sparsifier is not None:
            raise ValueError(f"cell {raw!r}: secagg sums integer codes: the spec must be intB without a sparsifier")
    return Cell(**values)
