"""SELMA's prompt-generation step: an instruction-tuned text generator writes prompts for one skill, and a ROUGE-L
filter keeps the diverse ones.

    python train/selma_prompts.py --skill whoops --model path/or/hub-id/of/an/instruct-lm --output prompts/whoops.jsonl
    python train/selma_prompts.py --skill-file my_skill.json --endpoint http://localhost:8000/v1 \\
        --model gpt-3.5-turbo-instruct --output prompts/my_skill.jsonl
    python train/selma_data.py --prompts whoops=prompts/whoops.jsonl ...   # the next step: images for the prompts

The output is the ``.jsonl`` prompt file ``train/selma_data.py --prompts SKILL=FILE`` reads: one
``{"prompt": ..., "skill": ..., "round": r, "round_kept": n}`` per kept prompt. The seed examples are not in it.

The procedure, as the official ``llm/prompt_generation.py`` (GitHub ``jialuli-luka/SELMA``, newest commit) runs it:

* a *pool* starts as the skill's 3 seed examples; each round sends ``--requests-per-round`` (5) requests, each
  built from the skill's rules and 3 examples drawn without replacement from the whole pool (seeds and prompts
  kept so far), numbered ``1.``-``3.``, asking for 20 more;
* a reply is read line by line: the line holding ``"4. "`` gives the text after it, then ``"5. "``, and so on
  (lines without the next number are skipped);
* each new prompt, in order, is scored with ROUGE-L F-measure (``rouge_score``, ``RougeScorer(["rougeL"],
  use_stemmer=False)``: lower-cased, every non-alphanumeric character a separator, no stemming) against every
  prompt in the pool, seeds included, and kept only if its highest score is not above 0.8 (``> 0.8`` drops,
  exactly 0.8 stays); a kept prompt joins the pool at once, so later prompts of the same round are compared
  with it too;
* rounds go on until 1000 prompts are kept; the round that crosses the target is kept whole, as official, so
  the file may hold a few more. Sampling at temperature 1.0, top-p 1.0, at most 3072 new tokens.

Departures, each named: the official prompt text is a triple-quoted string whose lines carry the source's
indentation; here the same words are dedented (:data:`SKILLS`). Empty prompts (a bare ``"4. "`` line), which the
official filter keeps (ROUGE-L of nothing is 0), are dropped, and surrounding whitespace is stripped. The
official examples are drawn with Python's unseeded global ``random``; here each round's draw is seeded from
``(--seed, round)``, so that a run can be repeated and resumed. The official generator is OpenAI's
``gpt-3.5-turbo-instruct`` (a completion model); here it is any local ``transformers`` causal LM
(:class:`TransformersGenerator`; its chat template is applied when it has one) or any OpenAI-compatible endpoint
(:class:`HTTPGenerator`, ``--api completions`` as official, or ``chat``). A chat reply (a chat template or
``--api chat``) that numbers its list from 1 instead of continuing it is read from ``"1. "``. The official
``"all"`` skill has rules but no seed examples in the script, so it is not offered.

Resumable: the prompts of a round are appended to the output in one write, flushed and fsynced; a rerun reads
the file back (the pool, and the next round from the last recorded one), drops a round that was cut short
(fewer lines than its ``round_kept``, or a torn last line) and continues. Each round's example draw and
sampling seed come from ``(--seed, round)`` alone, so with a deterministic generator (a local model) a resumed
run ends with exactly the file an uninterrupted one writes. The settings are recorded next to the output
(``<output>.settings.json``); a rerun with other settings is refused, not mixed in.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

#: the official values (``llm/prompt_generation.py``): examples per request, requests per round, new prompts asked
#: per request, ROUGE-L threshold, prompts to keep, sampling, and the reply's token budget
NUM_EXAMPLES = 3
REQUESTS_PER_ROUND = 5
NEW_PER_REQUEST = 20
ROUGE_L_THRESHOLD = 0.8
NUM_PROMPTS = 1000
TEMPERATURE = 1.0
TOP_P = 1.0
MAX_TOKENS = 3072
SETTINGS_SUFFIX = ".settings.json"


class PromptGenerationError(RuntimeError):
    """The generator or the output file cannot be used; the message names which and the fix."""


@dataclass(frozen=True)
class Skill:
    """A skill: its ``name`` (also the ``"skill"`` of every output line), the ``rules`` block of the request
    (numbered lines), and its ``seeds`` (at least ``NUM_EXAMPLES`` example prompts)."""

    name: str
    rules: str
    seeds: tuple[str, ...]

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> Skill:
        """A skill from a JSON file ``{"name": str, "rules": str, "seeds": [str, ...]}``."""
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except OSError as err:
            raise PromptGenerationError(f"skill file {str(path)!r} cannot be read ({err})") from None
        except ValueError as err:
            raise PromptGenerationError(f"skill file {path} is not valid JSON ({err})") from None
        if not isinstance(data, dict):
            raise PromptGenerationError(f"skill file {path} must hold a JSON object with name, rules and seeds")
        name, rules, seeds = data.get("name"), data.get("rules"), data.get("seeds")
        if not isinstance(name, str) or not name.isidentifier():
            raise PromptGenerationError(f"skill file {path}: 'name' must be a Python identifier, e.g. 'counting'")
        if not isinstance(rules, str) or not rules.strip():
            raise PromptGenerationError(f"skill file {path}: 'rules' must be a non-empty string (the numbered "
                                        f"rules the generator follows)")
        if not (isinstance(seeds, list) and all(isinstance(s, str) and s.strip() for s in seeds)):
            raise PromptGenerationError(f"skill file {path}: 'seeds' must be a list of non-empty strings")
        return cls(name, rules.strip(), tuple(s.strip() for s in seeds))


_COMMON_RULE_1 = ("1. The image should be used to evaluate one of the skills of an image generator: spatial, count, "
                  "animal, human, object, location, activity, color, attribute, food, material, shape.")
_DAILY_OBJECTS = "3. The image descriptions need to mention diverse objects that frequently appear in daily life"


def _rules(*lines: str) -> str:
    return "\n".join(lines)


#: the official skills (``llm/prompt_generation.py``: ``encode_prompt`` for the rules, ``seeds`` per skill);
#: the rules keep the official numbering, which skips 2 in every skill but CountBench
SKILLS = {
    "coco": Skill("coco", _rules(
        _COMMON_RULE_1, _DAILY_OBJECTS + ".", "4. The image descriptions should be less than 30 words.",
        "5. The text style of the image descriptions should be different from each other."), (
        "Dogs stick their heads out of car windows.",
        "A brown purse is sitting on a green bench.",
        "A group of motorcycle riders driving past buildings.")),
    "localized_narratives": Skill("localized_narratives", _rules(
        _COMMON_RULE_1, _DAILY_OBJECTS + ".", "4. The image descriptions should be less than 50 words.",
        "5. The text style of the image descriptions should be different from each other, but generally in the "
        "style of paragraph captions."), (
        "In this image we can see a pie on a large spatula. On the backside we can see some fire.",
        ("Here we can see a woman having a football in her hand and behind her we can see group of people standing "
        "and it is snowy."),
        ("This image is taken in a store where we can see mirrors, chairs, wall, lights, ceiling, bottles, tripod "
        "stands, frames, jar, table and a cupboard."))),
    "diffusiondb": Skill("diffusiondb", _rules(
        _COMMON_RULE_1, _DAILY_OBJECTS + ".", "4. The image descriptions should be less than 50 words.",
        "5. The text style of the image descriptions should be different from each other, but describe the image "
        "in details."), (
        ("a beautiful painting of a pyramid on the moon by nekro and pascal blanche and syd mead and greg rutkowski "
        "and sachin teng and victo ngai and simon stalenhag and chris voy and tsutomu nihei. in style of cg art. "
        "ray tracing, cel shading, 3 d. ue 5. hyper detailed. realistic. maya. octane render."),
        ("a highly detailed digital illustration of a cute corgi puppy floating in outer space, hyperrealistic, "
        "stunning, beautiful, cinematic, sci - fi, greg rutkowski, artgerm, moebius, ruan jia, makoto shinkai, "
        "simon stalenhag."),
        "portrait of a beautiful, elegant winged goddess with horns by tom bagshaw.")),
    "countbench": Skill("countbench", _rules(
        "1. The image descriptions should be able to evaluate model's capability to count objects.",
        "2. The count should not be larger than 3.", _DAILY_OBJECTS + ".",
        "4. The image descriptions should be less than 30 words.",
        "5. The text style of the image descriptions should be different from each other."), (
        "background photo of three light bulbs",
        "A look at style queen Maxima's four inauguration outfits",
        "Image showing four steps of preparing homemade goulash in a pot.")),
    "whoops": Skill("whoops", _rules(
        _COMMON_RULE_1, _DAILY_OBJECTS + ", but have some commonsense-defying combination.",
        "4. The image descriptions should be less than 30 words.",
        "5. The text style of the image descriptions should be different from each other."), (
        "A man sleeps in the middle of the highway.",
        "Wheat is covered by snow.",
        "A slice of chocolate cake served with cherry tomatoes.")),
}
# The official Midjourney skill shares DiffusionDB's rules.
SKILLS["midjourney"] = Skill("midjourney", SKILLS["diffusiondb"].rules, (
    ("high priestess tarot card, black background, moon theme, witchery, high detail, sketch art with intricate "
    "background, dynamic pose, closeup"),
    "A generic comic book location, African Jungle, comic book panel",
    ("cinematic shot of a Walter White themed like game of thrones, space explosion, action, cinematic, "
    "photorealstic, 8k, cinematic lighting")))


def build_request(skill: Skill, examples: Sequence[str], new_per_request: int = NEW_PER_REQUEST) -> str:
    """The text sent to the generator: the request for ``new_per_request`` descriptions, the skill's rules, and
    ``examples`` numbered from 1 (each as ``"\\n{i}. {example}\\n"``, as official), ending where the generator
    continues with the next number."""
    text = (f"Please create {new_per_request} more diverse image descriptions. Here are several rules for creating "
            f"the image description:\n{skill.rules}\n\nHere're some image description examples:\n")
    return text + "".join(f"\n{i}. {example}\n" for i, example in enumerate(examples, 1))


def parse_numbered(reply: str, first_number: int) -> list[str]:
    """The prompts of one reply, read as official: going through its lines, a line holding ``"{k}. "`` (``k``
    from ``first_number`` up) gives the text between the first and any second ``"{k}. "``, and ``k`` moves on;
    other lines are skipped. Whitespace around a prompt is stripped and empty ones are dropped (the official
    code keeps them)."""
    prompts, number = [], first_number
    for line in reply.split("\n"):
        marker = f"{number}. "
        if not line or marker not in line:
            continue
        prompt = line.split(marker)[1].strip()
        number += 1
        if prompt:
            prompts.append(prompt)
    return prompts


def parse_reply(reply: str, num_examples: int, restart_numbering: bool) -> list[str]:
    """:func:`parse_numbered` from ``num_examples + 1`` (a continued list, as official); with
    ``restart_numbering`` (chat replies) a reply with none of those is read again from ``1``."""
    prompts = parse_numbered(reply, num_examples + 1)
    if not prompts and restart_numbering:
        prompts = parse_numbered(reply, 1)
    return prompts


class RougeLFilter:
    """The official diversity filter: ``rouge_score``'s ROUGE-L F-measure, default tokenizer, no stemmer.

    :meth:`accepts` is ``max over pool of F(candidate, p) <= threshold``. The tokens of each text are computed
    once (a cache around the library's own tokenizer, handed to ``RougeScorer`` through its ``tokenizer``
    argument), as the official script pre-tokenises its pool; the score itself is ``RougeScorer.score``."""

    def __init__(self, threshold: float = ROUGE_L_THRESHOLD):
        from rouge_score import rouge_scorer, tokenizers

        default = tokenizers.DefaultTokenizer(use_stemmer=False)
        tokens: dict[str, list[str]] = {}  # one filter per run: the cache holds the pool's texts, as official

        class CachedTokenizer(tokenizers.Tokenizer):
            def tokenize(self, text: str) -> list[str]:
                if text not in tokens:
                    tokens[text] = default.tokenize(text)
                return tokens[text]

        self.threshold = float(threshold)
        self.scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False, tokenizer=CachedTokenizer())

    def max_score(self, candidate: str, pool: Sequence[str]) -> float:
        """Highest ROUGE-L F-measure of ``candidate`` against the texts of ``pool`` (0 for an empty pool)."""
        return max((self.scorer.score(candidate, text)["rougeL"].fmeasure for text in pool), default=0.0)

    def accepts(self, candidate: str, pool: Sequence[str]) -> bool:
        return self.max_score(candidate, pool) <= self.threshold


# ------------------------------------------------------------------------------------------ generators


class TransformersGenerator:
    """A local ``transformers`` causal LM: each request is sampled on its own (``do_sample=True`` at
    ``temperature`` / ``top_p``, at most ``max_new_tokens``, capped by the model's context), from the torch
    seed the round gives, inside :func:`torch.random.fork_rng` (the caller's RNG state is left as it was).
    With ``chat_template`` (default: when the tokenizer has one, as instruction-tuned models do) each request
    is the user turn of a chat; the reply's numbering may then restart at 1 (:func:`parse_reply`)."""

    def __init__(self, model, tokenizer, *, temperature: float = TEMPERATURE, top_p: float = TOP_P,
                 max_new_tokens: int = MAX_TOKENS, chat_template: bool | None = None, name: str = ""):
        self.model, self.tokenizer = model.eval(), tokenizer
        self.temperature, self.top_p, self.max_new_tokens = temperature, top_p, max_new_tokens
        self.restart_numbering = (getattr(tokenizer, "chat_template", None) is not None if chat_template is None
                                  else chat_template)
        self.name = name or getattr(model.config, "_name_or_path", "") or type(model).__name__

    @classmethod
    def from_pretrained(cls, path: str, *, device: str | None = None, **options) -> TransformersGenerator:
        """Load the model and tokenizer in ``path`` (a local folder or a hub id) with ``transformers``' Auto
        classes."""
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(path)
            model = AutoModelForCausalLM.from_pretrained(path)
        except (OSError, ValueError) as err:
            raise PromptGenerationError(f"--model {path!r}: no causal language model and tokenizer could be "
                                        f"loaded ({err}); give a local folder or hub id of an instruction-tuned "
                                        f"LM, or --endpoint URL") from None
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        return cls(model.to(device), tokenizer, name=str(path), **options)

    def describe(self) -> dict:
        return {"kind": "transformers", "model": self.name, "temperature": self.temperature, "top_p": self.top_p,
                "max_new_tokens": self.max_new_tokens, "chat_template": self.restart_numbering}

    def __call__(self, requests: Sequence[str], seed: int) -> list[str]:
        import torch

        context = (getattr(self.model.config, "max_position_embeddings", None)
                   or getattr(self.model.config, "n_positions", None))
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        replies = []
        devices = [self.model.device] if self.model.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.inference_mode():
            torch.manual_seed(seed)
            for request in requests:
                if self.restart_numbering:
                    ids = self.tokenizer.apply_chat_template([{"role": "user", "content": request}],
                                                             add_generation_prompt=True, return_tensors="pt",
                                                             return_dict=True)["input_ids"]
                else:
                    ids = self.tokenizer(request, return_tensors="pt").input_ids
                budget = self.max_new_tokens if context is None else min(self.max_new_tokens,
                                                                         context - ids.shape[1])
                if budget <= 0:
                    raise PromptGenerationError(f"model {self.name}: a request is {ids.shape[1]} tokens, its "
                                                f"context {context}; use a model with a longer context")
                ids = ids.to(self.model.device)
                out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True,
                                          temperature=self.temperature, top_p=self.top_p, max_new_tokens=budget,
                                          pad_token_id=pad)
                replies.append(self.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
        return replies


class HTTPGenerator:
    """An OpenAI-compatible server at ``base_url`` (e.g. ``http://localhost:8000/v1``: vLLM, llama.cpp,
    text-generation-inference, or OpenAI itself).

    ``api="completions"`` (official: ``gpt-3.5-turbo-instruct`` through the completions API) posts one
    ``/completions`` request per round with the round's prompts as a list and reads ``choices[i].text`` by
    ``index``; ``api="chat"`` posts one ``/chat/completions`` request per prompt (a user message) and reads
    ``choices[0].message.content``. The round's seed goes in the ``seed`` field. Failures are retried
    ``retries`` times (``retry_wait`` seconds, doubling); then :class:`PromptGenerationError` names the URL."""

    def __init__(self, base_url: str, model: str, *, api: str = "completions", api_key: str | None = None,
                 temperature: float = TEMPERATURE, top_p: float = TOP_P, max_tokens: int = MAX_TOKENS,
                 timeout: float = 600.0, retries: int = 3, retry_wait: float = 2.0):
        parsed = urllib.parse.urlparse(base_url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise PromptGenerationError(f"--endpoint {base_url!r} is not an http(s) URL; give the server's base "
                                        f"URL, e.g. http://localhost:8000/v1")
        if api not in ("completions", "chat"):
            raise PromptGenerationError(f"api={api!r} must be 'completions' or 'chat'")
        self.base_url, self.model, self.api, self.api_key = base_url.rstrip("/"), model, api, api_key
        self.temperature, self.top_p, self.max_tokens = temperature, top_p, max_tokens
        self.timeout, self.retries, self.retry_wait = timeout, retries, retry_wait
        self.restart_numbering = api == "chat"

    def describe(self) -> dict:
        return {"kind": "http", "endpoint": self.base_url, "model": self.model, "api": self.api,
                "temperature": self.temperature, "top_p": self.top_p, "max_tokens": self.max_tokens}

    def _post(self, path: str, payload: dict) -> dict:
        url = f"{self.base_url}/{path}"
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(url, data=json.dumps(payload).encode(), headers=headers, method="POST")
        wait, problem = self.retry_wait, ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(wait)
                wait *= 2
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    body = response.read()
            except urllib.error.HTTPError as err:
                problem = f"HTTP {err.code}: {err.read()[:300].decode('utf-8', 'replace')}"
                if err.code not in (408, 409, 429) and err.code < 500:
                    break  # a client error (bad model name, bad key) does not heal by retrying
                continue
            except (urllib.error.URLError, OSError) as err:
                problem = f"unreachable ({getattr(err, 'reason', err)})"
                continue
            try:
                return json.loads(body)
            except ValueError:
                problem = f"the reply is not JSON: {body[:200]!r}"
                break
        raise PromptGenerationError(f"generator endpoint {url}: {problem} (after {attempt + 1} attempt(s)); check "
                                    f"that the server runs there and --endpoint/--model/--api")

    def __call__(self, requests: Sequence[str], seed: int) -> list[str]:
        sampling = {"model": self.model, "temperature": self.temperature, "top_p": self.top_p,
                    "max_tokens": self.max_tokens, "n": 1, "seed": seed}
        try:
            if self.api == "completions":
                reply = self._post("completions", {**sampling, "prompt": list(requests)})
                choices = sorted(reply["choices"], key=lambda choice: choice.get("index", 0))
                texts = [choice["text"] for choice in choices]
            else:
                texts = []
                for request in requests:
                    reply = self._post("chat/completions",
                                       {**sampling, "messages": [{"role": "user", "content": request}]})
                    texts.append(reply["choices"][0]["message"]["content"])
        except (KeyError, IndexError, TypeError, AttributeError) as err:
            raise PromptGenerationError(f"generator endpoint {self.base_url}: the reply lacks the {self.api} "
                                        f"API's fields ({type(err).__name__}: {err}); is it OpenAI-compatible, "
                                        f"and is --api right?") from None
        if len(texts) != len(requests) or not all(isinstance(t, str) for t in texts):
            raise PromptGenerationError(f"generator endpoint {self.base_url}: {len(texts)} text replies for "
                                        f"{len(requests)} prompts")
        return texts


# ------------------------------------------------------------------------------------------ the run


@dataclass
class GenerationResult:
    """The output file, the prompts it holds (in order), the rounds run by this call, and the round the file had
    reached when the call began (0 for a fresh file)."""

    path: Path
    prompts: list[str]
    rounds_run: int
    resumed_at_round: int


def read_progress(path: Path, skill: str) -> tuple[list[str], int]:
    """``(prompts, next round)`` from an output file, cutting off a round that was not written whole.

    Every line must be ``{"prompt": str, "skill": skill, "round": int, "round_kept": int}``, grouped by round in
    ascending order. A round is whole when it has ``round_kept`` lines; a file written whole ends with a newline,
    so a last line without one is torn and counts as missing (its round is then short). Every round but the last
    must be whole (else the file was edited: refused); a short last round is truncated away, to be redone."""
    if not path.exists():
        return [], 0
    raw = path.read_bytes()
    lines = raw.split(b"\n")
    lines.pop()  # the text after the last newline: empty, or a torn line
    records, starts, offset = [], [], 0
    for number, line in enumerate(lines, 1):
        starts.append(offset)
        offset += len(line) + 1
        try:
            record = json.loads(line)
            valid = (isinstance(record, dict) and isinstance(record.get("prompt"), str)
                     and type(record.get("round")) is int and type(record.get("round_kept")) is int
                     and record["round_kept"] > 0 and record["round"] >= 0)
        except ValueError:
            valid = False
        if not valid:
            raise PromptGenerationError(f"{path}:{number} is not a prompt line written by this script; move the "
                                        f"file away or give another --output")
        if record.get("skill") != skill:
            raise PromptGenerationError(f"{path}:{number} holds prompts of skill {record.get('skill')!r}, not "
                                        f"{skill!r}; give another --output")
        records.append(record)
    groups: list[tuple[int, int]] = []  # (first index, end index) of each round's lines
    for index, record in enumerate(records):
        if groups and records[groups[-1][0]]["round"] == record["round"]:
            groups[-1] = (groups[-1][0], index + 1)
            continue
        if groups and record["round"] < records[groups[-1][0]]["round"]:
            raise PromptGenerationError(f"{path}:{index + 1}: round {record['round']} after a later round; the "
                                        f"file was edited, give another --output")
        groups.append((index, index + 1))
    keep = 0
    for position, (first, end) in enumerate(groups):
        expected, found = records[first]["round_kept"], end - first
        if found == expected and all(records[i]["round_kept"] == expected for i in range(first, end)):
            keep = end
        elif position == len(groups) - 1 and found < expected:
            break  # cut short by an interruption
        else:
            raise PromptGenerationError(f"{path}: round {records[first]['round']} has {found} lines, not "
                                        f"{expected}, and is not the last; the file was edited, give another "
                                        f"--output")
    cut = starts[keep] if keep < len(records) else offset
    if cut != len(raw):
        with open(path, "r+b") as handle:
            handle.truncate(cut)
            handle.flush()
            os.fsync(handle.fileno())
    next_round = records[keep - 1]["round"] + 1 if keep else 0
    return [record["prompt"] for record in records[:keep]], next_round


def _check_settings(path: Path, settings: dict, resuming: bool) -> None:
    from visadapt.io import write_json_atomic

    settings_path = path.with_name(path.name + SETTINGS_SUFFIX)
    if resuming and settings_path.is_file():
        try:
            recorded = json.loads(settings_path.read_text(encoding="utf-8"))
        except ValueError as err:
            raise PromptGenerationError(f"{settings_path} is not valid JSON ({err}); move it and {path} away, or "
                                        f"give another --output") from None
        if not isinstance(recorded, dict):
            recorded = {}
        differ = sorted(k for k in set(recorded) | set(settings) if recorded.get(k) != settings.get(k))
        if differ:
            raise PromptGenerationError(
                f"{path} was generated with other settings ({', '.join(differ)} differ, see {settings_path}); "
                f"rerun with the recorded settings to continue it, or give another --output")
        return
    if resuming:
        raise PromptGenerationError(f"{path} holds prompts but {settings_path} is missing, so the settings they "
                                    f"were made with are unknown; give another --output")
    write_json_atomic(settings_path, settings)


def round_seed(seed: int, round_number: int) -> int:
    """The sampling seed of one round: a function of ``(seed, round)`` alone, below 2**31."""
    return (seed * 1_000_003 + round_number * 7_919 + 17) % (2**31 - 1)


def generate_prompts(skill: Skill, generator: Callable[[Sequence[str], int], list[str]], output: str | os.PathLike,
                     *, num_prompts: int = NUM_PROMPTS, num_examples: int = NUM_EXAMPLES,
                     requests_per_round: int = REQUESTS_PER_ROUND, new_per_request: int = NEW_PER_REQUEST,
                     threshold: float = ROUGE_L_THRESHOLD, seed: int = 0, max_rounds: int | None = None,
                     progress: bool = True) -> GenerationResult:
    """Generate prompts for ``skill`` into the JSONL file ``output`` until it holds ``num_prompts`` (the
    procedure and the resume rule are in the module docstring). ``generator(requests, seed) -> replies`` is a
    :class:`TransformersGenerator`, an :class:`HTTPGenerator`, or any callable with that signature (a
    ``restart_numbering`` attribute, when true, lets replies number from 1; a ``describe()`` method, when
    present, goes into the recorded settings). ``max_rounds``: stop after this many rounds in this call even
    short of the target (``None``: no limit, as official). ``progress``: the kept prompts counted on stderr
    (:mod:`visadapt.progress`: a bar on a terminal, lines in a log)."""
    if len(skill.seeds) < num_examples:
        raise PromptGenerationError(f"skill {skill.name!r} has {len(skill.seeds)} seed prompts; each request "
                                    f"shows {num_examples}, give at least that many")
    for name, value in (("num_prompts", num_prompts), ("num_examples", num_examples),
                        ("requests_per_round", requests_per_round), ("new_per_request", new_per_request)):
        if not isinstance(value, int) or value <= 0:
            raise PromptGenerationError(f"{name}={value!r} must be a positive integer")
    if not 0.0 <= threshold <= 1.0:
        raise PromptGenerationError(f"threshold={threshold} must be in [0, 1] (a ROUGE-L F-measure)")
    output = Path(output)
    if output.suffix != ".jsonl":  # train/selma_data.py reads JSON lines only from a .jsonl file
        raise PromptGenerationError(f"--output {str(output)!r} must end in .jsonl, the prompt file "
                                    f"train/selma_data.py reads")
    output.parent.mkdir(parents=True, exist_ok=True)
    describe = getattr(generator, "describe", None)
    settings = {"skill": dataclasses.asdict(skill), "generator": describe() if describe else type(generator).__qualname__,
                "num_examples": num_examples, "requests_per_round": requests_per_round,
                "new_per_request": new_per_request, "threshold": threshold, "seed": seed}
    settings = json.loads(json.dumps(settings))  # tuples as lists, as they read back
    resuming = output.exists() and output.stat().st_size > 0
    _check_settings(output, settings, resuming)
    kept, round_number = read_progress(output, skill.name)
    start_round = round_number
    pool = list(skill.seeds) + kept
    rouge = RougeLFilter(threshold)
    restart_numbering = bool(getattr(generator, "restart_numbering", False))
    from visadapt.progress import Progress

    bar = Progress(total=num_prompts, initial=min(len(kept), num_prompts), desc=f"[{skill.name}] prompts kept",
                   unit="prompts", enabled=progress)
    rounds_run = 0
    try:
        with open(output, "ab") as handle:
            while len(kept) < num_prompts and (max_rounds is None or rounds_run < max_rounds):
                draw = random.Random(f"selma-prompts/{seed}/{round_number}")
                requests = [build_request(skill, draw.sample(pool, num_examples), new_per_request)
                            for _ in range(requests_per_round)]
                replies = generator(requests, round_seed(seed, round_number))
                new = []
                for reply in replies:
                    for candidate in parse_reply(reply, num_examples, restart_numbering):
                        if rouge.accepts(candidate, pool):
                            pool.append(candidate)
                            new.append(candidate)
                if new:  # the round's lines in one write: a crash leaves it whole or detectably short
                    handle.write(b"".join(json.dumps({"prompt": p, "skill": skill.name, "round": round_number,
                                                      "round_kept": len(new)}).encode() + b"\n" for p in new))
                    handle.flush()
                    os.fsync(handle.fileno())
                kept.extend(new)
                bar.update(len(new))
                round_number += 1
                rounds_run += 1
    finally:
        bar.close()
    return GenerationResult(output, kept, rounds_run, start_round)


def parse_args(argv: list[str] | None, prog: str | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=prog or "train/selma_prompts.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--skill", choices=sorted(SKILLS), help="one of the official skills")
    which.add_argument("--skill-file", help='a JSON file {"name": ..., "rules": ..., "seeds": [...]}')
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="a transformers causal LM: a local folder or a hub id")
    source.add_argument("--endpoint", help="base URL of an OpenAI-compatible server, e.g. http://localhost:8000/v1")
    p.add_argument("--endpoint-model", default="gpt-3.5-turbo-instruct", help="with --endpoint: the model name")
    p.add_argument("--api", choices=("completions", "chat"), default="completions", help="with --endpoint")
    p.add_argument("--retries", type=int, default=3, help="with --endpoint: retries of a failed request")
    p.add_argument("--api-key-env", default="OPENAI_API_KEY",
                   help="with --endpoint: the environment variable holding the key (none sent when unset)")
    p.add_argument("--output", required=True, help="the .jsonl prompt file (appended to; a rerun continues it)")
    p.add_argument("--num-prompts", type=int, default=NUM_PROMPTS)
    p.add_argument("--threshold", type=float, default=ROUGE_L_THRESHOLD, help="ROUGE-L F above which a prompt "
                                                                              "is dropped")
    p.add_argument("--examples", type=int, default=NUM_EXAMPLES, help="examples shown per request")
    p.add_argument("--requests-per-round", type=int, default=REQUESTS_PER_ROUND)
    p.add_argument("--new-per-request", type=int, default=NEW_PER_REQUEST, help="prompts asked for per request")
    p.add_argument("--temperature", type=float, default=TEMPERATURE)
    p.add_argument("--top-p", type=float, default=TOP_P)
    p.add_argument("--max-tokens", type=int, default=MAX_TOKENS, help="new tokens per reply at most")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-rounds", type=int, default=None, help="stop after this many rounds (default: none)")
    p.add_argument("--device", default=None, help="--model only; default: cuda when available, else cpu")
    from visadapt.progress import add_no_progress_flag, apply_no_progress_flag

    add_no_progress_flag(p)
    args = p.parse_args(argv)
    apply_no_progress_flag(args)
    return args


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    args = parse_args(argv, prog)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        print("error: train/selma_prompts.py appends to one file; run it as one process (python, not a "
              "multi-process accelerate launch)", file=sys.stderr)
        return 2
    try:
        skill = SKILLS[args.skill] if args.skill else Skill.from_file(args.skill_file)
        if args.endpoint:
            generator = HTTPGenerator(args.endpoint, args.endpoint_model, api=args.api,
                                      api_key=os.environ.get(args.api_key_env), temperature=args.temperature,
                                      top_p=args.top_p, max_tokens=args.max_tokens, retries=args.retries)
        else:
            generator = TransformersGenerator.from_pretrained(args.model, device=args.device,
                                                              temperature=args.temperature, top_p=args.top_p,
                                                              max_new_tokens=args.max_tokens)
        result = generate_prompts(skill, generator, args.output, num_prompts=args.num_prompts,
                                  num_examples=args.examples, requests_per_round=args.requests_per_round,
                                  new_per_request=args.new_per_request, threshold=args.threshold, seed=args.seed,
                                  max_rounds=args.max_rounds, progress=not args.no_progress)
    except PromptGenerationError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    resumed = f", continued from round {result.resumed_at_round}" if result.resumed_at_round else ""
    print(f"[{skill.name}] {len(result.prompts)} prompts kept after {result.rounds_run} round(s){resumed} -> "
          f"{result.path}")
    return 0


if __name__ == "__main__":  # python -m visadapt.train.<module>: the usage line names that command
    from visadapt.train import module_prog

    sys.exit(main(prog=module_prog(__spec__)))
