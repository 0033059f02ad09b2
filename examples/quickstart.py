"""Inject the bundled corpus into a memory and ask the bundled questions (library-level quickstart)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

import model as mp
from model.tokenizer import decode, encode

HERE = Path(__file__).parent


def main(model_name: str = "tiny") -> None:
    lm = mp.load(model_name)
    if lm.info.get("label"):
        print(f"model {model_name}: {lm.info['label']}")
    state = lm.new_state(seed=0)
    ids = encode(lm.tokenizer, (HERE / "corpus.txt").read_text())
    chunk = lm.cfg.num_tokens * 32
    for start in range(0, len(ids), chunk):
        lm.inject(state, torch.tensor(ids[start : start + chunk]))
    print(f"injected {state.tokens_injected} tokens in {state.injections} chunks")
    settings = mp.DecodeSettings(max_new_tokens=16)
    for line in (HERE / "questions.txt").read_text().splitlines():
        question, gold = (part.strip() for part in line.split("|"))
        answer = mp.generate(lm, state, encode(lm.tokenizer, f"Question: {question}\nAnswer:"), settings)
        print(f"Q: {question}\nA: {decode(lm.tokenizer, answer.token_ids)!r}   (expected: {gold})")


if __name__ == "__main__":
    main(*sys.argv[1:])
