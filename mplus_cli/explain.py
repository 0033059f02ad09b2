"""`mplus ask --explain`: what a question read. For M+, which injections the retrieved long-term rows came
from (per layer and in total, with a snippet of each source chunk); for both models, how much of each recent
injection the short-term memory still holds. Built on row provenance (model.memory.provenance)."""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path
from typing import Any

import torch

import model as mp
from model import store as st
from model.memory.provenance import survival
from model.store.inject import Chunk, session_chunks
from model.text.chunking import chunked, token_stream
from model.text.sources import text_blocks
from model.text.tokenizer import decode

from .errors import MplusError

RECENT = 5  # recent injections whose short-term share is shown
TOP = 8  # injections named in the total (the rest are summed)
TOP_PER_LAYER = 3
SNIPPET_CHARS = 72


@functools.cache
def source_snippets(tokenizer, source: str, sha256: str, chunk_tokens: int) -> tuple[str, ...]:
    """The start of each chunk's text, re-read from the source file when it still holds the same text."""
    path = Path(source)
    if source == "<stdin>" or not path.is_file():
        return ()
    digest = hashlib.sha256()
    try:
        for _ in text_blocks(path, source, digest):
            pass
        if digest.hexdigest() != sha256:
            return ()
        texts = [
            " ".join(decode(tokenizer, ids).split())
            for ids in chunked(token_stream(tokenizer, text_blocks(path, source)), chunk_tokens)
        ]
    except (MplusError, OSError):
        return ()
    return tuple(text if len(text) <= SNIPPET_CHARS else text[: SNIPPET_CHARS - 1] + "…" for text in texts)


def snippet(lm: mp.MemoryLLM, chunk: Chunk) -> str | None:
    texts = source_snippets(lm.tokenizer, chunk.source, chunk.sha256, chunk.chunk_tokens)
    return texts[chunk.index] if chunk.index < len(texts) else None


def shares(injections: torch.Tensor) -> list[tuple[int, float]]:
    """(injection, share) of injection numbers [m], largest share first."""
    values, counts = injections.unique(return_counts=True)
    order = counts.argsort(descending=True, stable=True)
    return [(int(values[i]), float(counts[i]) / injections.numel()) for i in order]


def explanation(
    lm: mp.MemoryLLM,
    state: mp.MemoryState,
    read: dict[int, torch.Tensor],
    session: st.Session | None,
    answer: mp.Generation | None = None,
) -> dict[str, Any]:
    """What a question read: `read` is {layer: retrieved row ids} (empty for MemoryLLM); with its `answer`, how
    many of its steps the copy from the rows read proposed the next words at (the demo's M+ flavour)."""
    chunks = session_chunks(session, state.injections) if session is not None else {}

    def named(injection: int) -> dict[str, Any]:
        chunk = chunks.get(injection)
        if injection == 0:
            return {"injection": 0, "source": "the model's own memory"}
        if chunk is None:
            return {"injection": injection, "source": None}
        where = {"source": chunk.source, "chunk": chunk.index + 1, "chunks": chunk.chunks}
        return {"injection": injection} | where | {"snippet": snippet(lm, chunk)}

    report: dict[str, Any] = {}
    if read:
        layers = {layer: shares(state.origins.injections(ids)) for layer, ids in sorted(read.items())}
        total = shares(torch.cat([state.origins.injections(ids) for ids in read.values()]))
        report["retrieved"] = [named(i) | {"share": round(s, 4)} for i, s in total[:TOP]]
        if len(total) > TOP:
            rest = {"injection": None, "source": f"{len(total) - TOP} other injections"}
            report["retrieved"].append(rest | {"share": round(sum(s for _, s in total[TOP:]), 4)})
        report["retrieved_per_layer"] = {str(k): [[i, round(s, 4)] for i, s in v] for k, v in layers.items()}
    if answer is not None and answer.copied:
        steps = len(answer.token_ids) + (answer.finish_reason == "stop")  # a token picked per step, the stop too
        report["copy"] = {"proposed": answer.copied, "steps": steps}
    recent = range(max(1, state.injections - RECENT + 1), state.injections + 1)
    report["short_term"] = [
        named(i) | {"held": round(survival(state, torch.tensor([i]))["stm"], 4)} for i in reversed(recent)
    ]
    return report


def describe(entry: dict[str, Any]) -> str:
    if entry["injection"] is None:
        return entry["source"]
    if entry["source"] is None:
        return f"injection {entry['injection']}"
    if entry["injection"] == 0:
        return entry["source"]
    text = f"injection {entry['injection']} ({entry['source']} chunk {entry['chunk']}/{entry['chunks']})"
    return text + (f': "{entry["snippet"]}"' if entry.get("snippet") else "")


def explanation_lines(report: dict[str, Any]) -> list[str]:
    """The report as the lines `ask --explain` prints on stderr."""
    lines = []
    if "retrieved" in report:
        lines.append("explain: the retrieved long-term rows came from")
        lines += [f"  {entry['share']:6.1%}  {describe(entry)}" for entry in report["retrieved"]]
        per_layer = [
            f"{layer}: " + ", ".join(f"#{i} {s:.0%}" for i, s in found[:TOP_PER_LAYER])
            for layer, found in report["retrieved_per_layer"].items()
            if found
        ]
        lines.append("  per layer (injection share): " + "; ".join(per_layer))
    if "copy" in report:
        copy = report["copy"]
        lines.append(
            f"explain: the copy from the rows read proposed the next words at {copy['proposed']} of the "
            f"answer's {copy['steps']} steps"
        )
    lines.append("explain: the short-term memory still holds of the latest injections")
    lines += [f"  {entry['held']:6.1%}  {describe(entry)}" for entry in report["short_term"]]
    return lines


def composition(state: mp.MemoryState, ids_per_layer: list[torch.Tensor]) -> torch.Tensor:
    """[L, I + 1] the share of each layer's rows that injection i wrote (column 0: the model's own rows)."""
    shares = torch.zeros(len(ids_per_layer), state.injections + 1)
    for layer, ids in enumerate(ids_per_layer):
        if ids.numel():
            counts = torch.bincount(state.origins.injections(ids), minlength=state.injections + 1)
            shares[layer] = counts[: state.injections + 1].float() / ids.numel()
    return shares


def draw_map(state: mp.MemoryState, path: Path, title: str) -> None:
    """The memory's composition as heat maps, short-term and (M+) long-term side by side: for each layer
    (rows) the share of its rows by the injection that wrote them (columns, oldest left)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    parts = {"short-term memory": composition(state, list(state.memory_ids))}
    if state.ltm is not None:
        parts["long-term memory"] = composition(state, [layer.row_ids for layer in state.ltm.layers])
    figure, axes = plt.subplots(1, len(parts), figsize=(6 * len(parts), 4), squeeze=False, constrained_layout=True)
    for ax, (name, shares) in zip(axes[0], parts.items(), strict=True):
        image = ax.imshow(shares.numpy(), aspect="auto", origin="lower", cmap="viridis", interpolation="nearest")
        ax.set(title=name, xlabel="injection (0: the model's own rows; oldest left)", ylabel="layer")
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        figure.colorbar(image, ax=ax, label="share of the layer's rows")
    figure.suptitle(title)
    figure.savefig(path, dpi=120)
    plt.close(figure)
