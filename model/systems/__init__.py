"""Memory systems side by side: one interface for anything that is told text and asked about it later.

A system is reset (seeded), injects token ids chunk by chunk, answers a question (greedy unless the
settings say otherwise) and saves / loads its state. MemoryLLM, M+ and the training-free demo are systems
(`latent`); so are the papers' baselines over the same model without memory (`truncate`, `bm25`,
`snapkv`). Other
packages add systems through the `mplus.systems` entry point group: each entry point names a factory
`factory(model, **params) -> MemorySystem`.

A system is named by a spec, `name` or `name:key=value,...` (`bm25:part=512,k=4`); `label` is the spec
with every parameter, defaults included, in key order: what results record.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Protocol

import torch

from ..core.generate import DecodeSettings
from ..core.memoryllm import MemoryLLM

ENTRY_POINTS = "mplus.systems"


@dataclass(frozen=True)
class Capabilities:
    """What a system can do, recorded beside its results."""

    persistent: bool  # save / load keep its state
    incremental: bool  # an inject adds to the state without reading what came before again
    question_aware_write: bool  # it sees the question when it writes (none here: questions come last)
    provenance: bool  # it can say which injected text an answer read


@dataclass(frozen=True)
class Answer:
    """A system's answer and what it cost."""

    text: str
    token_ids: list[int]
    context_tokens: int  # injected tokens the question read as text (baselines) or as memory rows (latent)
    first_token_s: float  # from the question to its first new token
    seconds: float  # the whole answer
    provenance: dict[int, float] | None = None  # injection number -> its rows the question read (mean per layer)


class MemorySystem(Protocol):
    name: str
    params: dict[str, Any]
    capabilities: Capabilities

    def reset(self, seed: int = 0) -> None: ...
    def inject(self, ids: torch.Tensor) -> None: ...
    def ask(self, question_ids: list[int], settings: DecodeSettings) -> Answer: ...
    def save(self, directory: Path) -> None: ...
    def load(self, directory: Path) -> None: ...


Factory = Callable[..., MemorySystem]  # factory(model, **params)


class SpecError(ValueError):
    """A spec that names no system, or parameters the system does not take."""


def builtin_factories() -> dict[str, Factory]:
    from .baselines import BM25, Truncate
    from .latent import LatentMemory
    from .snapkv import snapkv

    return {"memory": LatentMemory, "truncate": Truncate, "bm25": BM25, "snapkv": snapkv}


def factories() -> dict[str, Factory]:
    """Every system by name: the built-in ones, then those of installed packages (`mplus.systems`)."""
    found = builtin_factories()
    for entry in metadata.entry_points(group=ENTRY_POINTS):
        found.setdefault(entry.name, entry)
    return found


def parse_spec(spec: str) -> tuple[str, dict[str, str]]:
    """`name:key=value,...` -> (name, {key: value})."""
    name, _, rest = spec.strip().partition(":")
    params = {}
    for item in filter(None, (part.strip() for part in rest.split(","))):
        key, equals, value = item.partition("=")
        if not equals or not key.strip() or not value.strip():
            raise SpecError(f"bad system parameter {item!r} in {spec!r}: write name:key=value,key=value")
        params[key.strip()] = value.strip()
    if not name:
        raise SpecError(f"no system name in {spec!r}")
    return name, params


def factory_of(spec: str) -> tuple[str, Factory | metadata.EntryPoint, dict[str, str]]:
    """(the name, factory and parameters of the system `spec` names); a SpecError for a name no system has."""
    name, params = parse_spec(spec)
    found = factories()
    if name not in found:
        raise SpecError(f"unknown system {name!r}: use one of {', '.join(found)} (or install a package that adds it)")
    return name, found[name], params


def build_system(spec: str, model: MemoryLLM) -> MemorySystem:
    """The system `spec` names, over `model`."""
    name, factory, params = factory_of(spec)
    factory = factory.load() if isinstance(factory, metadata.EntryPoint) else factory
    try:
        return factory(model, **params)
    except TypeError as e:
        raise SpecError(f"system {name!r} does not take these parameters ({', '.join(params)}): {e}") from e
    except ValueError as e:  # a parameter's value
        raise SpecError(f"system {name!r}: {e}") from e


def described(system: MemorySystem) -> dict[str, Any]:
    """What results record of a system beside its label: its parameters and capabilities."""
    return {"params": system.params, "capabilities": asdict(system.capabilities)}


def label(system: MemorySystem) -> str:
    """The system's name and every parameter in key order: `bm25:k=8,part=512`."""
    params = ",".join(f"{key}={value}" for key, value in sorted(system.params.items()))
    return f"{system.name}:{params}" if params else system.name


__all__ = [
    "Answer",
    "Capabilities",
    "MemorySystem",
    "SpecError",
    "build_system",
    "described",
    "factories",
    "factory_of",
    "label",
    "parse_spec",
]
