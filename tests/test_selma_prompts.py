"""SELMA's prompt-generation step (train/selma_prompts.py): the official ROUGE-L filter restated against
``rouge_score``, the official loop, resume after interruptions, a tiny local causal LM, and an OpenAI-compatible
endpoint served by a stub HTTP server. No network."""
from __future__ import annotations

import importlib.util
import json
import random
import socket
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
from rouge_score import rouge_scorer
from train_scripts import TRAIN_DIR, load_train_script

pytestmark = pytest.mark.usefixtures("_one_thread")  # tests/conftest.py


def _load_prompts_script():
    """train/selma_prompts.py as a module registered in sys.modules (its dataclasses need their module there)."""
    spec = importlib.util.spec_from_file_location("train_selma_prompts", TRAIN_DIR / "selma_prompts.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


P = _load_prompts_script()
SKILL = P.Skill("toys", "1. The image descriptions should mention toys.\n2. Less than 10 words.",
                ("a red ball on a table", "two teddy bears in a box", "a wooden train on the floor"))
# Candidate prompts the scripted generator answers with: near-copies of each other and of the seeds, and new ones.
CANDIDATES = ["a red ball on a table", "A RED ball, on the table!", "a blue kite in the sky", "a blue kite in a sky",
              "three dolls sit on a shelf", "a toy car races down a ramp", "a toy car racing down the ramp",
              "a puzzle with missing pieces", "a green yoyo", "robots made of lego bricks", "a yellow rubber duck",
              "a yellow rubber duck floats", "marbles spill across the carpet", "a kite", "a doll house at night"]


def official_tokens(text):
    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)._tokenizer.tokenize(text)


def official_keep(candidates, all_instructions):
    """The official filter of llm/prompt_generation.py, restated with rouge_score exactly as it calls it:
    tokens from RougeScorer(["rougeL"], use_stemmer=False)._tokenizer, rouge_scorer._score_lcs(new, existing),
    drop when max fmeasure > 0.8, a kept prompt joins all_instructions at once."""
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    all_instructions = list(all_instructions)
    tokens = [scorer._tokenizer.tokenize(t) for t in all_instructions]
    kept = []
    for candidate in candidates:
        new_tokens = scorer._tokenizer.tokenize(candidate)
        scores = [rouge_scorer._score_lcs(new_tokens, t).fmeasure for t in tokens]
        if max(scores) > 0.8:
            continue
        kept.append(candidate)
        all_instructions.append(candidate)
        tokens.append(new_tokens)
    return kept


def test_filter_is_the_official_rouge_l_rule():
    pool = list(SKILL.seeds)
    rouge = P.RougeLFilter()
    assert rouge.threshold == 0.8
    # exactly 0.8 stays (the official test is "> 0.8"): 4 of 6 tokens in order, F = 2 * 1 * 2/3 / (5/3)
    seed6 = "one two three four five six"
    score = rouge_scorer._score_lcs(official_tokens("one two three four"), official_tokens(seed6)).fmeasure
    assert score == 0.8 and rouge.accepts("One, two; three four!", [seed6])
    # lower-cased, punctuation a separator, no stemming ("bears" is not "bear")
    assert rouge.max_score("A RED ball, on the table!", pool) == pytest.approx(
        rouge_scorer._score_lcs(official_tokens("a red ball on the table"), official_tokens(SKILL.seeds[0])).fmeasure)
    assert rouge.max_score("teddy bear box", ["teddy bears box"]) == pytest.approx(2 / 3)
    # sequential: a candidate is compared with the prompts kept before it in the same round
    candidates = ["a blue kite in the sky", "a blue kite in a sky", "a green yoyo"]
    kept = [c for c in candidates if rouge.accepts(c, pool) and not pool.append(c)]
    assert kept == official_keep(candidates, SKILL.seeds) == ["a blue kite in the sky", "a green yoyo"]
    for order in range(5):  # crafted prompts in several orders: the same verdicts as the official loop
        shuffled = random.Random(order).sample(CANDIDATES, len(CANDIDATES))
        pool = list(SKILL.seeds)
        assert [c for c in shuffled if rouge.accepts(c, pool) and not pool.append(c)] == official_keep(
            shuffled, SKILL.seeds)


def test_request_and_reply_follow_the_official_format():
    request = P.build_request(SKILL, ["x y", "z", "w"])
    assert request.startswith("Please create 20 more diverse image descriptions. Here are several rules")
    assert request.endswith("Here're some image description examples:\n\n1. x y\n\n2. z\n\n3. w\n")
    # official post_process: the line holding "4. " gives what follows it, then "5. "; other lines skipped
    reply = "4. a cat\n\nnoise\n5. two dogs 5. ignored\n7. skipped, 6 comes first\n6. a bird\n"
    assert P.parse_reply(reply, 3, restart_numbering=False) == ["a cat", "two dogs", "a bird"]
    assert P.parse_reply("1. a\n2. b", 3, restart_numbering=False) == []
    assert P.parse_reply("1. a\n2. b", 3, restart_numbering=True) == ["a", "b"]
    assert P.parse_reply("4. \n5. b", 3, restart_numbering=False) == ["b"]  # empty prompts dropped


class ScriptedGenerator:
    """Replies with numbered CANDIDATES drawn from the round's seed; records the requests; can fail at a round."""

    def __init__(self, fail_at_round_seed=None):
        self.requests, self.fail_at = [], fail_at_round_seed

    def __call__(self, requests, seed):
        if seed == self.fail_at:
            raise KeyboardInterrupt
        self.requests.append(list(requests))
        return [reply_for(seed, i) for i in range(len(requests))]


def reply_for(seed, index):
    draw = random.Random(seed * 10 + index).sample(CANDIDATES, 3)
    return "".join(f"{n}. {text}\n" for n, text in enumerate(draw, 4))


def test_generation_is_the_official_loop(tmp_path):
    generator = ScriptedGenerator()
    result = P.generate_prompts(SKILL, generator, tmp_path / "toys.jsonl", num_prompts=6, requests_per_round=2,
                                progress=False)
    # the official loop restated: all_instructions starts as the seeds, rounds until enough are kept, a round
    # is kept whole; each reply is parsed from "4. "
    expected, all_instructions, round_number = [], list(SKILL.seeds), 0
    while len(expected) < 6:
        seed = P.round_seed(0, round_number)
        candidates = [c for i in range(2) for c in P.parse_numbered(reply_for(seed, i), 4)]
        new = official_keep(candidates, all_instructions)
        expected += new
        all_instructions += new
        round_number += 1
    assert result.prompts == expected and len(expected) >= 6
    assert "a red ball on a table" not in result.prompts  # a seed copy is dropped
    # the examples of every request: 3 distinct prompts of the pool as it stood (seeds and prompts kept before)
    pool = set(SKILL.seeds)
    lines = [json.loads(line) for line in (tmp_path / "toys.jsonl").read_text().splitlines()]
    for round_number, requests in enumerate(generator.requests):
        for request in requests:
            examples = [line.split(". ", 1)[1] for line in request.split("examples:\n")[1].split("\n") if line]
            assert len(set(examples)) == 3 and set(examples) <= pool
        pool |= {line["prompt"] for line in lines if line["round"] == round_number}
    # the output feeds train/selma_data.py
    assert load_train_script("selma_data").read_prompts(tmp_path / "toys.jsonl") == result.prompts
    assert all(line["skill"] == "toys" for line in lines)


def test_an_interrupted_run_resumes_to_the_same_file(tmp_path):
    whole = P.generate_prompts(SKILL, ScriptedGenerator(), tmp_path / "whole.jsonl", num_prompts=8,
                               requests_per_round=1, progress=False)
    reference = (tmp_path / "whole.jsonl").read_bytes()
    assert len({line["round"] for line in map(json.loads, reference.splitlines())}) >= 3
    out = tmp_path / "resumed.jsonl"
    with pytest.raises(KeyboardInterrupt):  # killed while waiting for round 2's replies
        P.generate_prompts(SKILL, ScriptedGenerator(P.round_seed(0, 2)), out, num_prompts=8,
                           requests_per_round=1, progress=False)
    assert 0 < len(out.read_bytes()) < len(reference) and reference.startswith(out.read_bytes())
    again = P.generate_prompts(SKILL, ScriptedGenerator(), out, num_prompts=8, requests_per_round=1, progress=False)
    assert out.read_bytes() == reference and again.prompts == whole.prompts and again.resumed_at_round >= 2
    # a crash in the middle of a round's write: a torn line, or a round short of its lines (cut after the first
    # line of a round of several lines, or inside its second line)
    records = [json.loads(line) for line in reference.splitlines()]
    second = max(i for i in range(1, len(records)) if records[i]["round"] == records[i - 1]["round"])
    start = sum(len(line) + 1 for line in reference.splitlines()[:second])
    for cut in (len(reference) - 5, start, start + 7):
        out.write_bytes(reference[:cut])
        P.generate_prompts(SKILL, ScriptedGenerator(), out, num_prompts=8, requests_per_round=1, progress=False)
        assert out.read_bytes() == reference
    # a finished file is left as it is; more prompts continue it
    assert P.generate_prompts(SKILL, ScriptedGenerator(), out, num_prompts=8, requests_per_round=1,
                              progress=False).rounds_run == 0
    # other settings are refused, not mixed in; so is an edited file
    with pytest.raises(P.PromptGenerationError, match="threshold"):
        P.generate_prompts(SKILL, ScriptedGenerator(), out, num_prompts=9, threshold=0.7, requests_per_round=1)
    with pytest.raises(P.PromptGenerationError, match="must end in .jsonl"):
        P.generate_prompts(SKILL, ScriptedGenerator(), tmp_path / "prompts.json", num_prompts=1)
    out.write_bytes(b"not json\n" + reference)
    with pytest.raises(P.PromptGenerationError, match="resumed.jsonl:1"):
        P.generate_prompts(SKILL, ScriptedGenerator(), out, num_prompts=9, requests_per_round=1, progress=False)


def test_progress_bar_only_on_a_terminal(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    P.generate_prompts(SKILL, ScriptedGenerator(), tmp_path / "a.jsonl", num_prompts=2, progress=True)
    assert "[toys] prompts kept" in capsys.readouterr().err
    P.generate_prompts(SKILL, ScriptedGenerator(), tmp_path / "b.jsonl", num_prompts=2, progress=False)
    assert "prompts kept" not in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ a local causal LM


WORDS = ["[UNK]", "[EOS]", "\n", "4.", "5.", "6.", "a", "red", "blue", "cat", "dog", "on", "table", "big"]


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    """A 1-layer GPT-2 built from a config with a word-level tokenizer built with ``tokenizers``, saved to a
    folder: no download."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("tiny_lm")
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Split(" ", behavior="removed")
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", eos_token="[EOS]",
                            pad_token="[EOS]").save_pretrained(folder)
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(WORDS), n_positions=512, n_embd=16, n_layer=1, n_head=2, bos_token_id=1,
                        eos_token_id=1)
    GPT2LMHeadModel(config).save_pretrained(folder)
    return folder


def test_local_causal_lm_samples_as_transformers_generate(tiny_lm):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    generator = P.TransformersGenerator.from_pretrained(str(tiny_lm), device="cpu", max_new_tokens=30)
    requests = [P.build_request(SKILL, SKILL.seeds), "a red cat"]
    torch.manual_seed(123)
    outside = torch.rand(3)
    torch.manual_seed(123)
    replies = generator(requests, seed=7)
    assert torch.equal(torch.rand(3), outside)  # the caller's RNG state is left alone
    # the owner's own call: seed once, sample each request in turn
    model, tokenizer = AutoModelForCausalLM.from_pretrained(tiny_lm), AutoTokenizer.from_pretrained(tiny_lm)
    torch.manual_seed(7)
    expected = []
    for request in requests:
        ids = tokenizer(request, return_tensors="pt").input_ids
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0, top_p=1.0,
                             max_new_tokens=30, pad_token_id=tokenizer.pad_token_id)
        expected.append(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
    assert replies == expected and any(replies)
    # an instruction-tuned model's chat template: the request is the user turn, replies may number from 1
    tokenizer.chat_template = "{% for m in messages %}user: {{ m['content'] }}\n{% endfor %}assistant:"
    chat = P.TransformersGenerator(model, tokenizer, max_new_tokens=30)
    assert chat.restart_numbering and not generator.restart_numbering
    torch.manual_seed(7)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": requests[1]}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)["input_ids"]
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, max_new_tokens=30,
                         pad_token_id=tokenizer.pad_token_id)
    assert chat(requests[1:], seed=7) == [tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)]


def test_cli_with_a_local_model_resumes_to_the_same_prompts(tiny_lm, tmp_path, capsys):
    skill_file = tmp_path / "skill.json"
    skill_file.write_text(json.dumps({"name": "toys", "rules": SKILL.rules, "seeds": list(SKILL.seeds)}))
    common = ["--skill-file", str(skill_file), "--model", str(tiny_lm), "--device", "cpu", "--max-tokens", "40",
              "--requests-per-round", "2", "--no-progress", "--seed", "3"]
    assert P.main([*common, "--output", str(tmp_path / "whole.jsonl"), "--max-rounds", "2"]) == 0
    whole = (tmp_path / "whole.jsonl").read_bytes()
    assert len(whole.splitlines()) >= 2  # the random model does write numbered lines that pass the filter
    for _ in range(2):
        assert P.main([*common, "--output", str(tmp_path / "split.jsonl"), "--max-rounds", "1"]) == 0
    assert (tmp_path / "split.jsonl").read_bytes() == whole
    assert "continued from round 1" in capsys.readouterr().out
    prompts = load_train_script("selma_data").read_prompts(tmp_path / "whole.jsonl")
    assert prompts == [json.loads(line)["prompt"] for line in whole.splitlines()]
    (tmp_path / "bad.json").write_text('{"name": "toys", "rules": "", "seeds": []}')
    assert P.main(["--skill-file", str(tmp_path / "bad.json"), "--model", str(tiny_lm), "--output",
                   str(tmp_path / "x.jsonl")]) == 2
    assert "'rules' must be a non-empty string" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ an HTTP endpoint


class StubOpenAI(BaseHTTPRequestHandler):
    """OpenAI-compatible completions and chat completions; answers from ``server.script`` (a list of
    ``(status, body)`` consumed in order, then numbered CANDIDATES), and records every request."""

    def log_message(self, *args):  # keep the test output clean
        pass

    def do_POST(self):
        payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.seen.append((self.path, dict(self.headers), payload))
        if self.server.script:
            status, body = self.server.script.pop(0)
        elif self.path.endswith("/completions") and "prompt" in payload:
            choices = [{"index": i, "text": reply_for(payload["seed"], i)} for i in range(len(payload["prompt"]))]
            status, body = 200, {"choices": choices[::-1]}  # out of order: the client sorts by index
        else:
            text = reply_for(payload["seed"], len(self.server.seen)).replace("4. ", "1. ", 1)
            text = text.replace("5. ", "2. ", 1).replace("6. ", "3. ", 1)  # a chat reply numbering from 1
            status, body = 200, {"choices": [{"message": {"role": "assistant", "content": text}}]}
        data = json.dumps(body).encode() if not isinstance(body, bytes) else body
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def stub_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), StubOpenAI)
    server.seen, server.script = [], []
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def test_http_completions_endpoint(stub_server, tmp_path):
    url = f"http://127.0.0.1:{stub_server.server_port}/v1"
    generator = P.HTTPGenerator(url, "gpt-3.5-turbo-instruct", api_key="k-test", retry_wait=0)
    result = P.generate_prompts(SKILL, generator, tmp_path / "http.jsonl", num_prompts=4, progress=False)
    path, headers, payload = stub_server.seen[0]
    assert path == "/v1/completions" and headers["Authorization"] == "Bearer k-test"
    assert len(payload["prompt"]) == 5 and payload["prompt"][0].endswith("\n3. " + payload["prompt"][0]
                                                                         .rsplit("\n3. ", 1)[1])
    assert {k: payload[k] for k in ("model", "temperature", "top_p", "max_tokens", "n", "seed")} == {
        "model": "gpt-3.5-turbo-instruct", "temperature": 1.0, "top_p": 1.0, "max_tokens": 3072, "n": 1,
        "seed": P.round_seed(0, 0)}
    # the same prompts as the scripted generator gives: choices were put back in index order
    reference = P.generate_prompts(SKILL, ScriptedGenerator(), tmp_path / "ref.jsonl", num_prompts=4, progress=False)
    assert result.prompts == reference.prompts
    # a server error is retried; a client error is not, and names the URL and the server's words
    stub_server.script = [(500, {"error": "busy"}), (400, {"error": "unknown model"})]
    with pytest.raises(P.PromptGenerationError, match=r"/v1/completions: HTTP 400.*unknown model.*2 attempt"):
        generator(["x"], seed=1)
    stub_server.script = [(200, b"<html>not json</html>")]
    with pytest.raises(P.PromptGenerationError, match="not JSON"):
        generator(["x"], seed=1)


def test_http_chat_endpoint_reads_replies_numbered_from_one(stub_server, tmp_path):
    url = f"http://127.0.0.1:{stub_server.server_port}/v1/"
    generator = P.HTTPGenerator(url, "some-chat-model", api="chat", retry_wait=0)
    result = P.generate_prompts(SKILL, generator, tmp_path / "chat.jsonl", num_prompts=3, progress=False)
    assert result.prompts and all(path == "/v1/chat/completions" for path, _, _ in stub_server.seen)
    assert stub_server.seen[0][2]["messages"][0]["role"] == "user" and "Authorization" not in stub_server.seen[0][1]
    stub_server.script = [(200, {"choices": []})]
    with pytest.raises(P.PromptGenerationError, match="lacks the chat API's fields"):
        generator(["x"], seed=1)


def test_unreachable_endpoints_are_named(tmp_path, capsys):
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}/v1"
    with pytest.raises(P.PromptGenerationError, match=rf"{url}/completions: unreachable.*2 attempt"):
        P.HTTPGenerator(url, "m", retries=1, retry_wait=0)(["x"], seed=0)
    assert P.main(["--skill", "whoops", "--endpoint", url, "--retries", "0", "--output",
                   str(tmp_path / "w.jsonl"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"{url}/completions: unreachable" in err and "--endpoint" in err
    with pytest.raises(P.PromptGenerationError, match="'file:///etc' is not an http"):
        P.HTTPGenerator("file:///etc", "m")
