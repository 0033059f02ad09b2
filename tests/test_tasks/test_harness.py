"""The lm-evaluation-harness model `mplus`: a real simple_evaluate on a local task, through the memory."""

from __future__ import annotations

import json

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval")  # the lm-eval extra (in dev: CI has it)

import model as mp  # noqa: E402
from model.text.tokenizer import decode, encode  # noqa: E402
from tasks.harness import MemoryHarnessModel  # noqa: E402

DOCS = [
    {"passage": "The lamp room code is 73914. The ferry leaves at 7:45.", "question": "Code?", "answer": "73914"},
    {"passage": "Marta's soup has smoked paprika. The kettle is blue.", "question": "Soup?", "answer": "paprika"},
]
TASK = """
task: mplus_tiny_recall
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{passage}}}}\\n\\n{{{{question}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 6
metric_list:
  - metric: exact_match
"""


@pytest.fixture(scope="module")
def harness_model():
    return MemoryHarnessModel(model="tiny-free-mplus")


def expected_answer(lm: mp.MemoryLLM, passage: str, question: str, tokens: int) -> str:
    """What the memory told `passage` answers to `question`, computed here without the harness model."""
    state = lm.new_state(0, mp.storage_dtype(lm))
    lm.inject(state, torch.tensor(encode(lm.tokenizer, passage)))
    stop = (lm.tokenizer.eos_token_id,)
    out = mp.generate(lm, state, encode(lm.tokenizer, question), mp.DecodeSettings(tokens, stop_token_ids=stop))
    text = decode(lm.tokenizer, out.token_ids)
    return text.split("\n")[0]


def test_simple_evaluate_asks_each_question_from_a_memory_of_its_passage(tmp_path, harness_model):
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps(doc) + "\n" for doc in DOCS))
    (tmp_path / "task.yaml").write_text(TASK.format(data=data))
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(tmp_path))
    results = lm_eval.simple_evaluate(model=harness_model, tasks=["mplus_tiny_recall"], task_manager=manager)
    assert "exact_match,none" in results["results"]["mplus_tiny_recall"]
    answers = [sample["resps"][0][0] for sample in results["samples"]["mplus_tiny_recall"]]
    lm = harness_model.lm
    assert answers == [expected_answer(lm, doc["passage"], doc["question"], 6) for doc in DOCS]


def test_loglikelihood_scores_the_continuation_after_the_question_from_memory(harness_model):
    from lm_eval.api.instance import Instance

    lm = harness_model.lm
    context, continuation = f"{DOCS[0]['passage']}\n\nCode?", " 73914"
    request = Instance("loglikelihood", {}, (context, continuation), 0)
    ((score, greedy),) = harness_model.loglikelihood([request])
    state = lm.new_state(0, mp.storage_dtype(lm))
    lm.inject(state, torch.tensor(encode(lm.tokenizer, DOCS[0]["passage"])))
    asked, wanted = encode(lm.tokenizer, "Code?"), encode(lm.tokenizer, continuation)
    logits = lm(torch.tensor([asked + wanted]), state).logits[0]  # [n, V]
    logprobs = torch.log_softmax(logits, -1)
    by_hand = sum(float(logprobs[len(asked) - 1 + i, token]) for i, token in enumerate(wanted))
    assert score == pytest.approx(by_hand, rel=1e-5)
    assert greedy == all(int(logprobs[len(asked) - 1 + i].argmax()) == t for i, t in enumerate(wanted))
    with pytest.raises(ValueError, match="needs a question"):
        harness_model.loglikelihood([Instance("loglikelihood", {}, ("text\n\n", " x"), 0)])
