"""The lm-evaluation-harness model `mplus`: each request's context goes into a memory, and only the question is
asked from it, so any lm-eval task (RULER, BABILong, LongBench, ...) measures what the memory keeps.

A request's context is cut at its last `separator` (default: a blank line): the text before it is injected
in chunks of `chunk_tokens` into a fresh memory (seeded), the text after it is the question. Requests that
share their text before the separator (a multiple-choice item's options) share one memory. Decoding is
greedy; `until` strings end an answer.

    pip install "mplus[lm-eval]"
    python -m tasks.harness --model mplus --model_args model=smollm2-135m --tasks TASK --include_path DIR

or from Python, after `import tasks.harness` (which registers the model):
`lm_eval.simple_evaluate(model="mplus", model_args="model=smollm2-135m", tasks=[...])`.
"""

from __future__ import annotations

import codecs

import torch
from lm_eval.api.instance import Instance
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

import model as mp
from model.text.chunking import chunk_sizes
from model.text.tokenizer import decode, encode


@register_model("mplus")
class MemoryHarnessModel(LM):
    def __init__(
        self,
        model: str = "smollm2-135m",
        separator: str = "\n\n",
        chunk_tokens: int = 512,
        max_gen_toks: int = 64,
        seed: int = 0,
        device: str = "cpu",
        **unused: object,
    ):
        super().__init__()
        self.lm = mp.load(model, device=device)
        self.separator = codecs.decode(separator, "unicode_escape") if "\\" in separator else separator  # \n given
        self.chunk_tokens = int(chunk_tokens)
        self.max_gen_toks, self.seed = int(max_gen_toks), int(seed)
        self.stops = tuple(i for i in (self.lm.tokenizer.eos_token_id,) if i is not None)
        self.cached: tuple[str, mp.MemoryState] | None = None

    def split(self, context: str) -> tuple[str, str]:
        """(what goes into memory, the question asked from it)."""
        memory, separator, question = context.rpartition(self.separator)
        return (memory, question) if separator else ("", context)

    def memory(self, text: str) -> mp.MemoryState:
        """A fresh memory told `text` in chunks (the last one kept for the next request with the same text)."""
        if self.cached is not None and self.cached[0] == text:
            return self.cached[1]
        state = self.lm.new_state(self.seed, mp.storage_dtype(self.lm))
        ids = torch.tensor(encode(self.lm.tokenizer, text), dtype=torch.long)
        if len(ids):
            for chunk in ids.split(chunk_sizes(len(ids), self.chunk_tokens)):
                self.lm.inject(state, chunk)
        self.cached = (text, state)
        return state

    def generate_until(self, requests: list[Instance]) -> list[str]:
        answers = []
        for request in requests:
            context, options = request.args
            memory, question = self.split(context)
            until = options.get("until") or []
            until = [until] if isinstance(until, str) else until
            settings = mp.DecodeSettings(int(options.get("max_gen_toks", self.max_gen_toks)), stop_token_ids=self.stops)
            out = mp.generate(self.lm, self.memory(memory), encode(self.lm.tokenizer, question), settings)
            text = decode(self.lm.tokenizer, out.token_ids)
            answers.append(min((text[: text.find(s)] for s in until if s in text), key=len, default=text))
        return answers

    @torch.no_grad()
    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        """log P(continuation | question, memory of the text before it), and whether greedy decoding gives it."""
        results = []
        for request in requests:
            context, continuation = request.args
            memory, question = self.split(context)
            asked, wanted = encode(self.lm.tokenizer, question), encode(self.lm.tokenizer, continuation)
            if not asked:
                raise ValueError(f"a loglikelihood request needs a question after its last {self.separator!r}")
            ids = torch.tensor([asked + wanted], dtype=torch.long)
            logits = self.lm(ids, self.memory(memory)).logits[0, len(asked) - 1 : -1]  # [c, V]: next-token logits
            logprobs = torch.log_softmax(logits.float(), dim=-1)
            target = torch.tensor(wanted)
            total = float(logprobs.gather(1, target[:, None]).sum())
            results.append((total, bool((logprobs.argmax(-1) == target).all())))
        return results

    def loglikelihood_rolling(self, requests: list[Instance]) -> list[float]:
        raise NotImplementedError("perplexity through a memory is not an lm-eval request here: use generative tasks")


if __name__ == "__main__":
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()
