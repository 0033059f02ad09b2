"""mplus serve: the OpenAI-compatible server answers from a memory state over real HTTP on 127.0.0.1."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

import model as mp
from model.text.tokenizer import decode, encode
from mplus_cli.common import stop_ids
from mplus_cli.server import Answerer, Server


@pytest.fixture(scope="module")
def served():
    """A tiny training-free M+ model told one fact, served on a free port; (base URL, model, state)."""
    lm = mp.load("tiny-free-mplus")
    state = lm.new_state(0)
    lm.inject(state, torch.tensor(encode(lm.tokenizer, "The lamp room code is 73914. " * 3)))
    server = Server(("127.0.0.1", 0), Answerer(lm, state, "notes", stop_ids(lm)), token=None)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}", lm, state, server
    server.shutdown()
    server.server_close()


def call(url: str, body: dict | None = None, headers: dict | None = None) -> tuple[int, bytes]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def greedy(lm, state, prompt: str, n: int) -> str:
    out = mp.generate(lm, state, encode(lm.tokenizer, prompt), mp.DecodeSettings(n, stop_token_ids=stop_ids(lm)))
    return decode(lm.tokenizer, out.token_ids)


def test_a_completion_is_the_greedy_answer_from_memory(served):
    url, lm, state, _ = served
    status, raw = call(
        f"{url}/v1/completions", {"model": "anything", "prompt": "The lamp room code is", "max_tokens": 6}
    )
    assert status == 200
    document = json.loads(raw)
    assert document["object"] == "text_completion" and document["model"] == "notes"
    assert document["choices"][0]["text"] == greedy(lm, state, "The lamp room code is", 6)
    assert document["choices"][0]["finish_reason"] in ("stop", "length")
    usage = document["usage"]
    assert usage["prompt_tokens"] == len(encode(lm.tokenizer, "The lamp room code is"))
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"] > usage["prompt_tokens"]
    assert json.loads(call(f"{url}/v1/models")[1])["data"][0]["id"] == "notes"


def test_a_streamed_completion_sends_the_same_text_in_events_then_done(served):
    url, lm, state, _ = served
    status, raw = call(f"{url}/v1/completions", {"prompt": "The lamp", "max_tokens": 8, "stream": True})
    events = [line.removeprefix("data: ") for line in raw.decode().split("\n\n") if line]
    assert status == 200 and events[-1] == "[DONE]"
    chunks = [json.loads(e)["choices"][0] for e in events[:-1]]
    assert "".join(c["text"] for c in chunks) == greedy(lm, state, "The lamp", 8)
    assert [c["finish_reason"] for c in chunks][-1] == "length" and all(c["finish_reason"] is None for c in chunks[:-1])


def test_a_stop_string_ends_the_answer_before_it(served):
    url, lm, state, _ = served
    whole = greedy(lm, state, "The lamp", 8)
    stop = whole[3:5]
    body = {"prompt": "The lamp", "max_tokens": 8, "stop": [stop]}
    choice = json.loads(call(f"{url}/v1/completions", body)[1])["choices"][0]
    assert choice["text"] == whole[: whole.find(stop)] and choice["finish_reason"] == "stop"
    raw = call(f"{url}/v1/completions", body | {"stream": True})[1].decode()  # no piece of the stop string is sent
    chunks = [json.loads(e.removeprefix("data: "))["choices"][0] for e in raw.split("\n\n") if e and "[DONE]" not in e]
    assert "".join(c["text"] for c in chunks) == choice["text"] and chunks[-1]["finish_reason"] == "stop"


@pytest.mark.parametrize(
    ("path", "body", "status", "says"),
    [
        ("/v1/completions", {"prompt": ""}, 400, "'prompt' must be one non-empty string"),
        ("/v1/completions", {"prompt": "x", "max_tokens": 100_000}, 400, "exceed the context"),
        ("/v1/completions", {"prompt": "x", "stop": [""]}, 400, "'stop'"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}, 400, "no chat template"),
        ("/v1/embeddings", {"input": "x"}, 404, "no route"),
    ],
)
def test_a_bad_request_gets_an_openai_error_document(served, path, body, status, says):
    got, raw = call(served[0] + path, body)
    assert got == status and says in json.loads(raw)["error"]["message"]


def test_with_a_token_every_request_needs_it(served):
    url, *_, server = served
    server.token = "s3cret"
    try:
        assert call(f"{url}/v1/models")[0] == 401
        assert call(f"{url}/v1/models", headers={"Authorization": "Bearer wrong"})[0] == 401
        assert call(f"{url}/v1/models", headers={"Authorization": "Bearer s3cret"})[0] == 200
    finally:
        server.token = None


def test_mplus_serve_listens_on_localhost_and_stops_on_ctrl_c(tmp_path):
    env = os.environ | {"MPLUS_HOME": str(tmp_path)}
    command = [sys.executable, "-m", "mplus_cli", "serve", "--model", "tiny", "--port", "0"]
    process = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True)
    try:
        line = ""
        while "serving" not in line:
            line = process.stderr.readline()
            assert line, "the server ended before it listened"
        url = re.search(r"http://127\.0\.0\.1:\d+", line).group(0)
        assert call(f"{url}/v1/completions", {"prompt": "abc", "max_tokens": 2})[0] == 200
    finally:
        process.send_signal(signal.SIGINT)
        rest = process.communicate(timeout=30)[1]
    assert process.returncode == 0 and "stopped serving" in rest


def test_a_server_for_other_machines_needs_remote_and_a_token(tmp_path):
    env = os.environ | {"MPLUS_HOME": str(tmp_path)}
    for extra in ([], ["--remote"], ["--token", "t"]):
        command = [sys.executable, "-m", "mplus_cli", "serve", "--model", "tiny", "--host", "0.0.0.0", *extra]
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
        assert result.returncode == 2 and result.stderr.count("\n") == 1
        assert "reaches other machines: pass --remote and --token" in result.stderr


@pytest.mark.slow
def test_the_demo_answers_a_chat_completion_from_its_session(tmp_path):
    from model import store as st
    from model.text.sources import plan_source

    lm = mp.load("smollm2-135m")
    st.Session.create(tmp_path, "notes", lm.initial_state, st.binding(lm, "smollm2-135m"), 0, mp.storage_dtype(lm))
    text = "examples/corpus.txt"
    sources = [plan_source(text, Path(text), lm.tokenizer, 512)]
    with st.Session.open(tmp_path, "notes").writer() as writer:
        st.inject_sources(
            writer,
            lm,
            sources,
            st.resume_plan(writer.session, sources, True, 512),
            512,
            st.InjectRun(tmp_path, "notes"),
        )
    state = st.Session.open(tmp_path, "notes").load_state(lm.initial_state)
    server = Server(("127.0.0.1", 0), Answerer(lm, state, "notes", stop_ids(lm)), token=None)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        question = {"role": "user", "content": "What is the access code to the lamp room?"}
        body = {"messages": [question], "max_tokens": 24}
        status, raw = call(f"http://127.0.0.1:{server.server_port}/v1/chat/completions", body)
    finally:
        server.shutdown()
        server.server_close()
    assert status == 200 and "73914" in json.loads(raw)["choices"][0]["message"]["content"]
