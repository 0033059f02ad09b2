"""The speed benches' baselines, in one place: the authors' procedures run on our modules, and whole-state
snapshots (MemoryState.save / load) for the session store. Each computes what the optimized path it is
measured against computes (the tests check this); only the way differs."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

import model as mp
from model.memory.state import draw_permutations
from model.policies.authors import order_oldest_first


# -- the authors' procedures ------------------------------------------------------------------------
def authors_delta(model: mp.MemoryLLM, ids: torch.Tensor, state: mp.MemoryState) -> torch.Tensor:
    """`model.compute_delta(ids, state)` computed the way the authors' injection runs (docs/algorithm.md §5,
    §11 item 18): every layer, the last one included, computes all max(n, K) query rows, a KV cache is filled,
    and the logits of the n tokens are computed and thrown away. Returns the same delta [L, k, d]."""
    return model.compute_delta(ids, state, like_authors=True)


@torch.no_grad()
def authors_inject(model: mp.MemoryLLM, ids: torch.Tensor, state: mp.MemoryState) -> None:
    """`model.inject(state, ids)` of a MemoryLLM whose memory is written, the way the authors' injection and
    update run (docs/algorithm.md §5.5): `authors_delta`, then the same permutations drawn, and each layer's
    survivors gathered and concatenated with its new rows into a new tensor that is copied into the memory
    (all layers at once under one shared permutation)."""
    delta = authors_delta(model, ids, state).to(state.memory.dtype)  # [L, k, d]
    N, k, memory = state.rows_per_layer, delta.shape[1], state.memory
    draws = model.cfg.num_layers if model.cfg.drop_memory_per_layer else 1
    perms = draw_permutations(state.generator, draws, N)  # [draws, N]
    keep = perms[:, : N - k].sort().values  # [draws, N - k]
    if draws == 1:
        memory.copy_(torch.cat([memory[:, keep[0]], delta], dim=1))
        return
    for layer in range(draws):
        memory[layer] = torch.cat([memory[layer][keep[layer]], delta[layer]])


@torch.no_grad()
def authors_retrieve(model: mp.MPlus, layer: int, state: mp.MemoryState, h: torch.Tensor) -> torch.Tensor:
    """The T LTM rows [T, d] (CPU) that `model.retrieve` picks, found the way the authors' `get_ltm` does on
    every call (docs/algorithm.md §6.5, §11 item 21): the layer's LTM keys and cached keys are copied to the
    model's device (a copy on the CPU too, standing for the host-to-device transfer) and scored there in the
    activation dtype, then the chosen rows are gathered on the CPU."""
    ltm, T = state.ltm, model.retrieved_rows
    q = model.retrieval.queries(model, layer, h)  # [n, s]
    keys = (ltm.layers[layer].keys, ltm.cached_keys[layer])  # [N, s], [C, s]
    scores = torch.cat([torch.sigmoid(q @ k.to(q.device, q.dtype, copy=True).T).mean(0) for k in keys])  # [N + C]
    chosen = scores.topk(T).indices.sort().values.cpu()  # [T]
    rows, ages = ltm.candidates(layer, chosen)
    return rows[order_oldest_first(ages)]


def authors_ask(
    model: mp.MemoryLLM,
    state: mp.MemoryState,
    ids: Sequence[int],
    settings: mp.DecodeSettings,
    on_token: Callable[[int], None] | None = None,
) -> mp.Generation:
    """`generate` the way the authors' model answers: the memory's keys/values are recomputed for every
    question instead of being reused from the previous one (none are kept on the state)."""
    return mp.generate(model, state, ids, settings, on_token=on_token, reuse_memory_kv=False)


def authors_cold_ask(
    model: mp.MemoryLLM, path: Path, ids: Sequence[int], settings: mp.DecodeSettings, device: torch.device
) -> mp.Generation:
    """A question in a fresh process the authors' way: the whole state saved at `path` is loaded
    (MemoryState.load), then answered by `authors_ask`."""
    return authors_ask(model, mp.MemoryState.load(path, device), ids, settings)


# -- whole-state snapshots: the session store's baseline ---------------------------------------------
def save_snapshot(state: mp.MemoryState, directory: Path) -> None:
    """MemoryState.save, then fsync, so that the baseline is as durable as a session's commit."""
    state.save(directory)
    for path in directory.iterdir():
        with open(path, "rb") as f:
            os.fsync(f.fileno())


def load_snapshot(path: Path, device: torch.device) -> mp.MemoryState:
    """MemoryState.load, then every tensor read (clone): load maps the files lazily."""
    return mp.MemoryState.load(path, device).clone()
