"""Toxics: faults the data plane injects into a listener's bridges, in
toxiproxy's vocabulary (kinds, attribute names and units, JSON shape) so
its users and its HTTP API map one to one.

A toxic belongs to one stream of a listener: "upstream" is what clients
send to the server, "downstream" what the server answers. Its toxicity is
the share of bridges it applies to: drawn once per bridge when the toxic
first reaches it. Toxics are set at run time (Proxy.set_toxics, add_toxic,
update_toxic, remove_toxic) and are not part of the configuration file.
This module is the model and its validation; the data plane (toxics.pxi)
applies them. See docs/faults.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple

from .values import ConfigError

__all__ = ["ToxicError", "Toxic", "toxic", "STREAMS", "KINDS", "ATTRIBUTES", "check_toxics"]

STREAMS = ("upstream", "downstream")
KINDS = ("latency", "bandwidth", "slow_close", "timeout", "reset_peer", "slicer", "limit_data")

# Every kind's attributes, in toxiproxy's names and units (all integers;
# a missing one takes toxiproxy's default, 0):
#   latency: latency (ms), jitter (ms)
#   bandwidth: rate (KB/s, KB = 1000 bytes: toxiproxy sleeps len/rate ms)
#   slow_close: delay (ms)
#   timeout: timeout (ms; 0: never close, only stop forwarding)
#   reset_peer: timeout (ms; 0: at once)
#   slicer: average_size (bytes), size_variation (bytes), delay (µs)
#   limit_data: bytes
ATTRIBUTES: Mapping[str, Tuple[str, ...]] = MappingProxyType({
    "latency": ("latency", "jitter"),
    "bandwidth": ("rate",),
    "slow_close": ("delay",),
    "timeout": ("timeout",),
    "reset_peer": ("timeout",),
    "slicer": ("average_size", "size_variation", "delay"),
    "limit_data": ("bytes",),
})

# The data plane keeps times in int64 nanoseconds and sizes in int64:
# a year of milliseconds and 2**48 bytes are far beyond any useful fault
# and keep every product (a delay in ns, a rate times a second) in range.
MAX_MS = 366 * 86400 * 1000
MAX_ATTRIBUTE = {
    "latency": MAX_MS, "jitter": MAX_MS, "delay": MAX_MS, "timeout": MAX_MS,
    "rate": 2**40, "average_size": 2**30, "size_variation": 2**30, "bytes": 2**48,
}
MAX_NAME = 200


class ToxicError(ConfigError):
    """A toxic that cannot be: one line naming the field and the value.
    A ConfigError, so a ValueError."""


def _check_int(field_name: str, value: object, top: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        # JSON numbers such as 100.0 are integers in toxiproxy's API too.
        if isinstance(value, float) and math.isfinite(value) and value == int(value):
            value = int(value)
        else:
            raise ToxicError(field_name, value, "expected an integer")
    if not 0 <= value <= top:
        raise ToxicError(field_name, value, f"expected an integer from 0 to {top}")
    return value


def _check_attributes(kind: str, attributes: Mapping[str, Any]) -> Dict[str, int]:
    names = ATTRIBUTES[kind]
    if not isinstance(attributes, Mapping):
        raise ToxicError("attributes", attributes, "expected a mapping of attribute names to integers")
    out = {name: 0 for name in names}
    for key, value in attributes.items():
        if key not in names:
            raise ToxicError(f"attributes.{key}", value,
                             f"not an attribute of a {kind} toxic (it has {', '.join(names)})")
        out[key] = _check_int(f"attributes.{key}", value, MAX_ATTRIBUTE[key])
    if kind == "slicer" and out["size_variation"] > out["average_size"] > 0:
        raise ToxicError("attributes.size_variation", out["size_variation"],
                         f"larger than average_size ({out['average_size']})")
    return out


@dataclass(frozen=True)
class Toxic:
    """One toxic. `attributes` is read-only and complete (every attribute
    of the kind, defaults filled in); build one with `toxic(...)` or
    `Toxic(kind, stream, toxicity, name, attributes)`: both validate."""

    kind: str
    stream: str = "downstream"
    toxicity: float = 1.0
    name: str = ""
    attributes: Mapping[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.kind, str) or self.kind not in KINDS:
            raise ToxicError("type", self.kind, f"expected one of {', '.join(KINDS)}")
        if not isinstance(self.stream, str) or self.stream not in STREAMS:
            raise ToxicError("stream", self.stream, f"expected one of {', '.join(STREAMS)}")
        toxicity = self.toxicity
        if (isinstance(toxicity, bool) or not isinstance(toxicity, (int, float))
                or not math.isfinite(toxicity) or not 0.0 <= toxicity <= 1.0):
            raise ToxicError("toxicity", toxicity, "expected a number from 0.0 to 1.0")
        object.__setattr__(self, "toxicity", float(toxicity))
        name = self.name
        if not isinstance(name, str):
            raise ToxicError("name", name, "expected a string")
        if name == "":
            name = f"{self.kind}_{self.stream}"
        if len(name) > MAX_NAME or not name.isprintable() or name.strip() != name:
            raise ToxicError("name", name, f"expected printable text of at most {MAX_NAME} characters, "
                             "without leading or trailing spaces")
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "attributes", MappingProxyType(_check_attributes(self.kind, self.attributes)))

    def __hash__(self) -> int:
        return hash((self.kind, self.stream, self.toxicity, self.name, tuple(sorted(self.attributes.items()))))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Toxic):
            return NotImplemented
        return (self.kind, self.stream, self.toxicity, self.name, dict(self.attributes)) == \
            (other.kind, other.stream, other.toxicity, other.name, dict(other.attributes))

    def __repr__(self) -> str:
        attrs = ", ".join(f"{k}={v}" for k, v in self.attributes.items())
        return (f"toxic({self.kind!r}, {self.stream!r}, toxicity={self.toxicity}, "
                f"name={self.name!r}{', ' if attrs else ''}{attrs})")

    def replace(self, *, toxicity: Optional[float] = None, **attributes: Any) -> "Toxic":
        """This toxic with `toxicity` and/or some attributes changed (the
        others kept); the name, kind and stream stay."""
        merged = dict(self.attributes)
        merged.update(attributes)
        return Toxic(self.kind, self.stream, self.toxicity if toxicity is None else toxicity,
                     self.name, merged)

    def to_json(self) -> Dict[str, Any]:
        """toxiproxy's JSON shape: name, type, stream, toxicity, attributes."""
        return {"name": self.name, "type": self.kind, "stream": self.stream,
                "toxicity": self.toxicity, "attributes": dict(self.attributes)}

    @classmethod
    def from_json(cls, obj: Any) -> "Toxic":
        """A toxic from toxiproxy's JSON shape (a decoded dict). "type" is
        required; "stream" defaults to downstream, "toxicity" to 1.0, "name"
        to type_stream, missing attributes to 0. Unknown keys are a
        ToxicError."""
        if not isinstance(obj, Mapping):
            raise ToxicError("toxic", obj, "expected a JSON object")
        unknown = set(obj) - {"name", "type", "stream", "toxicity", "attributes"}
        if unknown:
            key = sorted(str(k) for k in unknown)[0]
            raise ToxicError(key, obj.get(key), "not a field of a toxic (name, type, stream, toxicity, attributes)")
        if "type" not in obj:
            raise ToxicError("type", None, f"missing: expected one of {', '.join(KINDS)}")
        attributes = obj.get("attributes")
        return cls(kind=obj["type"], stream=obj.get("stream", "downstream"),
                   toxicity=obj.get("toxicity", 1.0), name=obj.get("name", "") or "",
                   attributes={} if attributes is None else attributes)


def toxic(kind: str, stream: str = "downstream", *, toxicity: float = 1.0, name: str = "",
          **attributes: int) -> Toxic:
    """A Toxic: toxic("latency", "upstream", latency=100, jitter=10)."""
    return Toxic(kind, stream, toxicity, name, attributes)


def check_toxics(toxics: Iterable[Toxic]) -> List[Toxic]:
    """The toxics as a list, each a Toxic, names unique (ToxicError
    naming the first one repeated)."""
    if isinstance(toxics, (Toxic, str, bytes, Mapping)):
        raise ToxicError("toxics", toxics, "expected an iterable of Toxic")
    out: List[Toxic] = []
    seen = set()
    for t in toxics:
        if not isinstance(t, Toxic):
            raise ToxicError("toxics", t, "expected a Toxic (fastproxy.toxic(...))")
        if t.name in seen:
            raise ToxicError("name", t.name, "a toxic of that name is already set on this listener")
        seen.add(t.name)
        out.append(t)
    return out
