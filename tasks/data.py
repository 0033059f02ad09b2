"""Question/answer samples with their evidence, and distractor passages from another split.

Five sources (docs/algorithm.md §9.1 for the authors' files; tasks.realtext for the real prose):
- `squad`: SQuAD v2 dev questions with answers; distractors are train-set paragraphs.
- `nq`: NaturalQuestions dev questions with a short answer, the long answer as evidence; distractors are
  long answers of train questions.
- `synthetic`: made-up facts with unique answers ("The vault code of the Orvela project is 4721.") and
  fact-free prose as distractors, generated offline from a fixed seed.
- `news`: questions made by a written rule from real news stories (dev / test split), offline.
- `niah`: needles in a haystack of real essays, at set depths, offline.

Real data comes from a local directory in the authors' layout (their dev/train files plus their
sample-index files) or, without one, from the hub through `datasets`.
"""

from __future__ import annotations

import itertools
import json
import random
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np

from model.zoo import hub

from . import realtext
from .samples import DataError, QAData, Sample, one_line, take_chars

DatasetName = Literal["synthetic", "news", "niah", "squad", "nq"]
DATASETS = get_args(DatasetName)
OFFLINE = ("synthetic", "news", "niah")  # built here from generated text or text that ships in a package
HUB_IDS = {"squad": "rajpurkar/squad_v2", "nq": "google-research-datasets/natural_questions"}
AUTHORS_FILES = {  # dev file, train file, sample-index file
    "squad": ("dev-v2.0.json", "train-v2.0.json", "indices_squad_3.npy"),
    "nq": ("v1.0-simplified_nq-dev-all.jsonl", "v1.0-simplified_simplified-nq-train.jsonl", "indices_nq_4.npy"),
}
MAX_ANSWER_WORDS = {"squad": 3, "nq": 4}  # hub data has no index files: the papers' short-answer filter
HTML_TAG = re.compile(r"<[^>]*>")


def load(
    name: str,
    *,
    limit: int | None,
    data_dir: Path | None = None,
    distractor_chars: int = 0,
    authors: bool = False,
    split: str = "test",
    lengths: tuple[int, ...] = (),
) -> QAData:
    """The first `limit` samples of a dataset and at least `distractor_chars` characters of distractors
    (SQuAD: the whole train set). `authors` keeps the authors' NQ distractor text, bug included; `split`:
    news's or niah's dev or test questions; `lengths`: the haystack lengths of niah's samples."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}: use one of {', '.join(DATASETS)}")
    if name == "synthetic":
        return synthetic(limit or 100, distractor_chars)
    if name == "news":
        return realtext.news(split, limit, distractor_chars, data_dir)
    if name == "niah":
        return realtext.niah(split, lengths, limit, distractor_chars, data_dir)
    if data_dir is None:
        return load_hub(name, limit, distractor_chars)
    directory = authors_layout(Path(data_dir), name)
    dev, train, index = (directory / file for file in AUTHORS_FILES[name])
    indices = [int(i) for i in np.load(index, allow_pickle=False)][:limit]  # never unpickle
    if name == "squad":
        samples, passages = squad_samples(dev), squad_passages(train)
    else:
        samples = list(itertools.islice(nq_dev_samples(dev), max(indices, default=-1) + 1))
        passages = take_chars(nq_train_passages(train, authors), distractor_chars)
    if indices and max(indices) >= len(samples):
        raise DataError(f"{index} refers to sample {max(indices)} but {dev} has {len(samples)} usable samples")
    return QAData(name, [samples[i] for i in indices], passages, f"authors' files in {directory}")


def authors_layout(data_dir: Path, name: str) -> Path:
    """The directory holding the authors' files: DIR/<name>, DIR/data/<name> or DIR itself."""
    if not data_dir.is_dir():
        raise FileNotFoundError(f"no data directory {data_dir}")
    for directory in (data_dir / name, data_dir / "data" / name, data_dir):
        if all((directory / file).is_file() for file in AUTHORS_FILES[name]):
            return directory
    expected = ", ".join(f"{name}/{file}" for file in AUTHORS_FILES[name])
    raise FileNotFoundError(f"{data_dir} does not hold the authors' {name} files ({expected})")


# -- SQuAD v2 -------------------------------------------------------------------------------------
def squad_samples(path: Path) -> list[Sample]:
    """Answerable questions in file order (the order the authors' index file refers to)."""
    articles = json.loads(path.read_text(encoding="utf-8"))["data"]
    return [
        Sample(qa["id"], paragraph["context"], qa["question"], qa["answers"][0]["text"])
        for article in articles
        for paragraph in article["paragraphs"]
        for qa in paragraph["qas"]
        if not qa.get("is_impossible") and qa["answers"]
    ]


def squad_passages(path: Path) -> list[str]:
    articles = json.loads(path.read_text(encoding="utf-8"))["data"]
    return [paragraph["context"] for article in articles for paragraph in article["paragraphs"]]


# -- NaturalQuestions -----------------------------------------------------------------------------
def nq_text(tokens: list[dict[str, Any]], start: int, end: int, html_key: str = "html_token") -> str:
    """Document tokens [start, end) without the HTML ones, joined by single spaces (as the authors)."""
    return " ".join(t["token"] for t in tokens[max(start, 0) : max(end, 0)] if not t[html_key])


def read_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    with path.open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def nq_dev_samples(path: Path) -> Iterator[Sample]:
    """Dev questions (original NQ format) that have a short answer; the long answer is the evidence."""
    for line in read_jsonl(path):
        annotation = line["annotations"][0]
        if not annotation["short_answers"]:
            continue
        tokens, long, short = line["document_tokens"], annotation["long_answer"], annotation["short_answers"][0]
        yield Sample(
            str(line["example_id"]),
            nq_text(tokens, long["start_token"], long["end_token"]),
            line["question_text"],
            nq_text(tokens, short["start_token"], short["end_token"]),
        )


def nq_train_passages(path: Path, authors: bool) -> Iterator[str]:
    """Long answers of the simplified train file. The authors slice `document_text` by *characters* with
    token offsets (docs/algorithm.md §9.1), which gives short snippets; we keep that only for `authors`."""
    for line in read_jsonl(path):
        long = line["annotations"][0]["long_answer"]
        start, end = long["start_token"], long["end_token"]
        if "document_tokens" in line:
            text = nq_text(line["document_tokens"], start, end)
        elif authors:
            text = line["document_text"][start - 1 : end]
        else:
            words = line["document_text"].split(" ")[max(start, 0) : max(end, 0)]
            text = " ".join(w for w in words if not HTML_TAG.fullmatch(w))
        if text.strip() or authors:
            yield text


# -- the hub --------------------------------------------------------------------------------------
def records(value: dict[str, list] | list[dict]) -> list[dict]:
    """A `datasets` sequence of structs as a list of dicts (it may come as a dict of lists)."""
    if isinstance(value, dict):
        return [dict(zip(value, row, strict=True)) for row in zip(*value.values(), strict=True)]
    return list(value)


def short_enough(answer: str, name: str) -> bool:
    return 0 < len(answer.split()) <= MAX_ANSWER_WORDS[name]


def squad_hub_sample(example: dict[str, Any]) -> Sample | None:
    texts = example["answers"]["text"]
    if not texts or not short_enough(texts[0], "squad"):
        return None
    return Sample(example["id"], example["context"], example["question"], texts[0])


def nq_hub_tokens(example: dict[str, Any]) -> list[dict[str, Any]]:
    return records(example["document"]["tokens"])


def nq_hub_sample(example: dict[str, Any]) -> Sample | None:
    annotations = records(example["annotations"])
    shorts = records(annotations[0]["short_answers"]) if annotations else []
    if not shorts:
        return None
    tokens, long = nq_hub_tokens(example), annotations[0]["long_answer"]
    answer = nq_text(tokens, shorts[0]["start_token"], shorts[0]["end_token"], "is_html")
    if not short_enough(answer, "nq"):
        return None
    context = nq_text(tokens, long["start_token"], long["end_token"], "is_html")
    return Sample(str(example["id"]), context, example["question"]["text"], answer)


def nq_hub_passage(example: dict[str, Any]) -> str:
    annotations = records(example["annotations"])
    if not annotations:
        return ""
    long = annotations[0]["long_answer"]
    return nq_text(nq_hub_tokens(example), long["start_token"], long["end_token"], "is_html")


def load_hub(name: str, limit: int | None, distractor_chars: int) -> QAData:
    """Dev-split questions with short answers (no index files on the hub), train-split distractors."""
    import datasets

    hub_id = HUB_IDS[name]
    offline = hub.offline() or datasets.config.HF_HUB_OFFLINE
    if not offline and not hub.reachable():  # the hub clients would retry for half a minute
        raise DataError(
            f"the hub ({hub.endpoint()}) is unreachable: pass --data-dir with the authors' files, or run this once "
            f"where the hub is reachable (datasets keeps a copy of {hub_id}) and then set HF_HUB_OFFLINE=1"
        )
    try:
        with hub.quiet():
            if name == "squad":
                dev = datasets.load_dataset(hub_id, split="validation")
                train = datasets.load_dataset(hub_id, split="train")
                samples = filter(None, map(squad_hub_sample, dev))
                passages: Iterable[str] = dict.fromkeys(example["context"] for example in train)
            else:
                dev = datasets.load_dataset(hub_id, split="validation", streaming=True)
                train = datasets.load_dataset(hub_id, split="train", streaming=True)
                samples = filter(None, map(nq_hub_sample, dev))
                passages = take_chars(filter(str.strip, map(nq_hub_passage, train)), distractor_chars)
            return QAData(name, list(itertools.islice(samples, limit)), list(passages), f"hub {hub_id}")
    except Exception as e:  # network, authentication, format: one line that says what to do
        reason = one_line(e)
        if offline:
            raise DataError(
                f"cannot load {hub_id} with HF_HUB_OFFLINE set ({reason}): pass --data-dir with the authors' files, "
                "or load it once with the hub reachable (datasets keeps a copy)"
            ) from e
        raise DataError(f"cannot load {hub_id} from the hub ({reason}); pass --data-dir with the authors' files") from e


# -- synthetic ------------------------------------------------------------------------------------
SYNTHETIC_SEED = 0
NAME_HEADS = ("Or", "Vel", "Tam", "Kor", "Bri", "Sal", "Mer", "Dun", "Gal", "Hes")
NAME_HEADS += ("Ith", "Jor", "Lun", "Nav", "Pel", "Quar", "Ros", "Tev", "Ul", "Zar")
NAME_TAILS = ("vela", "ion", "ara", "eth", "ova", "ian", "ost", "ira", "und", "elle")
NAME_TAILS += ("amar", "isk", "oth", "enna", "ubar", "ilde", "ask", "orin", "esta", "yx")
KINDS = ("project", "station", "archive", "lighthouse", "expedition", "foundry", "observatory", "library")
ATTRIBUTES = ("vault code", "access code", "serial number", "badge number")
ATTRIBUTES += ("locker number", "ticket number", "door code", "account number")
FILLER = (
    "The {e} was started by a small group of engineers.",
    "Most of the work at the {e} happens at night.",
    "Few people outside the team have heard of the {e}.",
    "The {e} keeps its records in a locked cabinet.",
    "Visitors to the {e} must sign in at the front desk.",
    "Funding for the {e} comes from a private trust.",
    "The {e} moved to a new building last spring.",
    "Staff at the {e} meet every Monday morning.",
)
PROSE = (
    ("The old farmer", "A young teacher", "The river", "A quiet village", "The committee", "An early train"),
    ("crossed", "watched", "repaired", "described", "followed", "painted", "visited", "measured"),
    ("the wooden bridge", "the harvest", "the market square", "a long letter", "the evening sky", "an old map"),
    ("before the rain began.", "during the long summer.", "while the bells rang.", "as the sun went down."),
)


def synthetic(limit: int, distractor_chars: int) -> QAData:
    """`limit` facts with unique entities and unique four-digit answers, and fact-free prose passages
    holding at least `distractor_chars` characters. Sample i is the same for every limit."""
    rng = random.Random(SYNTHETIC_SEED)
    entities = [f"{head}{tail} {kind}" for head in NAME_HEADS for tail in NAME_TAILS for kind in KINDS]
    codes = list(range(1000, 10000))
    rng.shuffle(entities)
    rng.shuffle(codes)
    if limit > len(entities):
        raise DataError(f"the synthetic dataset has {len(entities)} samples, fewer than --limit {limit}")
    samples = []
    for i, entity in enumerate(entities[:limit]):
        attribute, code = ATTRIBUTES[i % len(ATTRIBUTES)], codes[i]
        first, second, last = (s.format(e=entity) for s in random.Random(f"synthetic-{i}").sample(FILLER, 3))
        context = f"{first} {second} The {attribute} of the {entity} is {code}. {last}"
        samples.append(Sample(f"syn-{i:05d}", context, f"What is the {attribute} of the {entity}?", str(code)))
    passages = take_chars(map(prose_passage, itertools.count()), distractor_chars)
    return QAData("synthetic", samples, passages, f"synthetic (generated, seed {SYNTHETIC_SEED})")


def prose_passage(j: int) -> str:
    """Passage j of the distractor prose: 6 to 10 sentences without digits or named entities."""
    rng = random.Random(f"synthetic-prose-{j}")
    return " ".join(" ".join(rng.choice(words) for words in PROSE) for _ in range(rng.randint(6, 10)))
