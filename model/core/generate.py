"""Decoding against a memory state: greedy by default, seeded sampling on request, KV cache, streaming."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch

from ..memory.state import MemoryState
from .memoryllm import AnswerBias, MemoryLLM


@dataclass(frozen=True)
class DecodeSettings:
    """How to pick tokens. Never read from a hub generation_config: callers say what they want."""

    max_new_tokens: int = 64
    sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    stop_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be at least 1")
        if self.sample and self.temperature <= 0:
            raise ValueError("temperature must be > 0 when sampling")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Generation:
    token_ids: list[int]  # new tokens, without the stop token
    finish_reason: str  # "stop" or "length"
    step_logits: list[torch.Tensor] = field(default_factory=list)  # [V] float32 per step, if kept
    copied: int = 0  # steps whose distribution the memory's answer bias changed (the demo's copy from its rows)


def biased(bias: AnswerBias | None, prompt: Sequence[int], out: Generation, logits: torch.Tensor) -> torch.Tensor:
    """The next token's logits [V] after the memory's answer bias over the prompt and `out` so far (counted in
    out.copied when the bias changed them)."""
    if bias is None:
        return logits
    shifted = bias([*prompt, *out.token_ids], logits)
    out.copied += shifted is not logits
    return shifted


def pick_token(logits: torch.Tensor, settings: DecodeSettings, generator: torch.Generator | None) -> int:
    """One token id from logits [V]: argmax, or a temperature / top-k / top-p sample."""
    if not settings.sample:
        return int(logits.argmax())
    logits = logits.float().cpu() / settings.temperature
    if settings.top_k > 0:
        kth = torch.topk(logits, min(settings.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if settings.top_p < 1:
        sorted_probs, order = probs.sort(descending=True)
        outside = sorted_probs.cumsum(0) - sorted_probs > settings.top_p  # keep the smallest nucleus
        sorted_probs[outside] = 0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))


@torch.no_grad()
def generate(
    model: MemoryLLM,
    state: MemoryState,
    prompt_ids: Sequence[int] | torch.Tensor,
    settings: DecodeSettings = DecodeSettings(),
    on_token: Callable[[int], None] | None = None,
    keep_logits: bool = False,
    reuse_memory_kv: bool = True,
    prefix_kv: Sequence[tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> Generation:
    """Answer `prompt_ids` from memory. The prefill reads the memory prefix; decode steps reuse the
    KV cache at positions prefix + prompt + t. The memory is not modified; its keys/values are kept on
    the state for the next question unless `reuse_memory_kv` is False. `prefix_kv` (per layer, keys after
    RoPE and values [1, H_kv, P, D] at positions 0..P-1) is read as the prefix instead of a memory state's
    (a KV-cache system's; `state` then has no rows)."""
    ids = torch.as_tensor(prompt_ids, dtype=torch.long).reshape(1, -1)
    if ids.numel() == 0:
        raise ValueError("the prompt is empty")
    P = model.prefix_length(state) if prefix_kv is None else prefix_kv[0][0].shape[2]
    n = ids.shape[1]
    generator = torch.Generator(device="cpu").manual_seed(settings.seed) if settings.sample else None
    stops = set(settings.stop_token_ids)
    out = Generation(token_ids=[], finish_reason="length")
    with model.caches(1, P + n + settings.max_new_tokens):
        if prefix_kv is not None:
            model.put_prefix(prefix_kv)
        input_pos = torch.arange(P, P + n)  # the prompt's positions after the memory prefix
        logits = model(ids, state, input_pos, reuse_memory_kv=reuse_memory_kv, last_only=True).logits[0, -1]
        bias, prompt = model.answer_bias(state), ids[0].tolist()  # after the prefill: what the memory read
        for step in range(settings.max_new_tokens):
            logits = biased(bias, prompt, out, logits)
            if keep_logits:
                out.step_logits.append(logits.cpu())
            token = pick_token(logits, settings, generator)
            if token in stops:
                out.finish_reason = "stop"
                break
            out.token_ids.append(token)
            if on_token is not None:
                on_token(token)
            if step + 1 < settings.max_new_tokens:
                input_pos = torch.tensor([P + n + step])
                logits = model(torch.tensor([[token]]), state, input_pos, last_only=True).logits[0, -1]
    return out


@dataclass
class BatchLayout:
    """Where a batch of questions sits in one KV cache. Element i's prefix (P_i rows) ends at slot Pm = max P;
    its prompt (n_i tokens, left-padded to nm = max n) ends at slot Pm + nm; answers follow at shared slots.
    Pads and other elements' unused slots are masked out."""

    prefix: torch.Tensor  # [B] P_i
    prompt: torch.Tensor  # [B] n_i

    @property
    def text_start(self) -> int:
        return int(self.prefix.max())

    @property
    def pads(self) -> list[int]:
        return (self.prompt.max() - self.prompt).tolist()

    def slots(self, step: int | None = None) -> torch.Tensor:
        """The prompt's slots [nm] (step None) or answer token `step`'s [1]."""
        end = self.text_start + int(self.prompt.max())
        return torch.arange(self.text_start, end) if step is None else torch.tensor([end + step])

    def positions(self, step: int | None = None) -> torch.Tensor:
        """RoPE positions [B, nm] of the prompt (a pad takes any: it is masked) or [B, 1] of answer token `step`."""
        if step is not None:
            return (self.prefix + self.prompt + step)[:, None]
        nm = int(self.prompt.max())
        index = torch.arange(nm)[None] - torch.tensor(self.pads)[:, None]  # [B, nm], negative on pads
        return (self.prefix[:, None] + index).clamp_min(0)

    def mask(self, slots: torch.Tensor) -> torch.Tensor:
        """[B, 1, S, end] which slots each query at `slots` [S] sees: its own prefix, its own text up to
        itself, and always itself (so that a pad's row stays finite)."""
        key = torch.arange(int(slots[-1]) + 1)  # [end]
        P, start = self.prefix[:, None], self.text_start
        own_prefix = (key >= start - P) & (key < start)  # [B, end]
        own_text = key >= start + torch.tensor(self.pads)[:, None]  # [B, end]
        causal = key[None] <= slots[:, None]  # [S, end]
        itself = key[None] == slots[:, None]  # [S, end]
        return (own_prefix[:, None] | (own_text[:, None] & causal[None]) | itself[None])[:, None]


@torch.no_grad()
def generate_batch(
    model: MemoryLLM,
    states: Sequence[MemoryState],
    prompts: Sequence[Sequence[int]],
    settings: DecodeSettings = DecodeSettings(),
    reuse_memory_kv: bool = True,
) -> list[Generation]:
    """Answer prompts[i] from states[i], all in one batch (independent memories, one forward per step);
    each answer is the one `generate` gives up to rounding. The memories are not modified."""
    if len(states) != len(prompts) or not prompts:
        raise ValueError("generate_batch takes one state per prompt, and at least one")
    if any(len(prompt) == 0 for prompt in prompts):
        raise ValueError("a prompt is empty")
    if len(prompts) == 1:  # the single-question path: the memory's cached keys adopted, not copied
        return [generate(model, states[0], prompts[0], settings, reuse_memory_kv=reuse_memory_kv)]
    layout = BatchLayout(
        torch.tensor([model.prefix_length(s) for s in states]), torch.tensor([len(p) for p in prompts])
    )
    ids = torch.zeros(len(prompts), int(layout.prompt.max()), dtype=torch.long)  # [B, nm] left-padded
    for i, prompt in enumerate(prompts):
        ids[i, layout.pads[i] :] = torch.as_tensor(prompt, dtype=torch.long)
    outs = [Generation(token_ids=[], finish_reason="length") for _ in prompts]
    generators = [torch.Generator().manual_seed(settings.seed) if settings.sample else None for _ in prompts]
    stops, running = set(settings.stop_token_ids), list(range(len(prompts)))
    end = layout.text_start + ids.shape[1] + settings.max_new_tokens
    with model.caches(len(prompts), end):
        slots = layout.slots()
        mask = layout.mask(slots).to(model.device)
        logits = model.forward_states(ids, states, slots, layout.positions(), mask, layout.pads, reuse_memory_kv)
        biases = [model.answer_bias(state) for state in states]  # after the prefill: what each memory read
        for step in range(settings.max_new_tokens):
            tokens = torch.zeros(len(prompts), 1, dtype=torch.long)  # finished elements read a pad
            for i in list(running):
                token = pick_token(biased(biases[i], prompts[i], outs[i], logits[i]), settings, generators[i])
                if token in stops:
                    outs[i].finish_reason = "stop"
                    running.remove(i)
                    continue
                outs[i].token_ids.append(token)
                tokens[i, 0] = token
            if not running or step + 1 == settings.max_new_tokens:
                break
            slots = layout.slots(step)
            mask = layout.mask(slots).to(model.device)
            logits = model.forward_states(tokens, states, slots, layout.positions(step), mask)
    return outs
