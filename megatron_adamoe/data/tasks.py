"""Multiple-choice tasks from text the pretrained model never trained on: the Shakespeare
documents outside pretraining's train split (Megatron's GPTDataset split: the first
round(train fraction x documents) documents train, in the indexed dataset's order), grouped by
play, fine-tuning and test items from different plays.

- ``next_line``: a passage of two lines from a speech; choose its true next line among four
  (the other three: lines of the same play), HellaSwag-style.
- ``speaker``: the first lines of a speech; name its speaker among four of the play's speakers.
- ``validation``: the test plays' held-out documents as text, for a validation loss (bits per
  byte through lm-eval's rolling log-likelihood) on text neither pretraining nor fine-tuning saw.

Records are in the fine-tuning format (question, choices, answer), rendered for training and
for adamoe-eval by the same template. Pure Python; deterministic for a seed."""

from __future__ import annotations

import random
import re
from typing import Iterable

from megatron_adamoe.errors import OptionError

TASKS = ("next_line", "speaker")
_SPEAKER = re.compile(r"^([A-Z][A-Z'&\- ]*[A-Z])\.$")  # "SIR TOBY." on a line of its own
_MIN_LINE = 12  # characters: a line long enough to tell apart


def held_out_plays(plays: Iterable[tuple[str, list[str]]], train_fraction: float) -> dict:
    """{play: its documents outside the train split} (plays in corpus order)."""
    plays = list(plays)
    total = sum(len(documents) for _, documents in plays)
    boundary = int(round(train_fraction * total))  # as Megatron's dataset builder rounds
    held, index = {}, 0
    for play, documents in plays:
        for document in documents:
            if index >= boundary:
                held.setdefault(play, []).append(document)
            index += 1
    return held


def speeches(documents: list[str]) -> list[tuple[str, list[str]]]:
    """(speaker, lines) of each speech in a play's consecutive documents; stage directions
    ([...]) left out."""
    found, speaker, lines = [], None, []
    for raw in "\n".join(documents).splitlines():
        line = raw.strip()
        header = _SPEAKER.match(line)
        if header or not line:
            if speaker and lines:
                found.append((speaker, lines))
            speaker, lines = (header.group(1), []) if header else (None, [])
        elif speaker and not line.startswith("["):
            lines.append(line)
    if speaker and lines:
        found.append((speaker, lines))
    return found


def next_line_items(play_speeches: list, rng: random.Random) -> list[dict]:
    pool = sorted({line for _, lines in play_speeches for line in lines if len(line) >= _MIN_LINE})
    items = []
    for _, lines in play_speeches:
        for i in range(2, len(lines)):
            target = lines[i]
            if len(target) < _MIN_LINE:
                continue
            others = [line for line in rng.sample(pool, 6) if line != target][:3]
            items.append(_item("\n".join(lines[i - 2 : i]), target, others, rng))
    return items


def speaker_items(play_speeches: list, rng: random.Random) -> list[dict]:
    counts: dict[str, int] = {}
    for speaker, _ in play_speeches:
        counts[speaker] = counts.get(speaker, 0) + 1
    speakers = sorted(name for name, count in counts.items() if count >= 3)  # the play's cast
    items = []
    for speaker, lines in play_speeches:
        quote = " / ".join(lines[:2])
        if speaker not in speakers or len(quote) < 2 * _MIN_LINE:
            continue
        others = rng.sample([name for name in speakers if name != speaker], 3)
        items.append(
            _item(f'Who says: "{quote}"?', speaker.title(), [o.title() for o in others], rng)
        )
    return items


def _item(question: str, right: str, wrong: list, rng: random.Random) -> dict:
    choices = [right, *wrong]
    rng.shuffle(choices)
    return {"question": question, "choices": choices, "answer": choices.index(right)}


def build_tasks(
    plays: Iterable[tuple[str, list[str]]],
    train_fraction: float,
    train_items: int,
    test_items: int,
    seed: int,
) -> dict:
    """{"manifest": {...}, "<task>_<train|test>": [records], "validation": [{play, text}]}: the
    held-out plays split by play (the largest fine-tunes, the others test), each task's items
    shuffled with ``seed`` and cut to the sizes asked; validation holds the test plays'
    documents whole."""
    held = held_out_plays(plays, train_fraction)
    if len(held) < 2:
        raise OptionError(
            f"split leaves {len(held)} play(s) outside the train split; tasks need two (one to "
            "fine-tune, one to test): give more to the validation/test splits"
        )
    by_size = sorted(held, key=lambda play: (-sum(map(len, held[play])), play))
    parts = {"train": by_size[:1], "test": by_size[1:]}
    rng = random.Random(seed)
    out = {
        "manifest": {
            "train_plays": parts["train"],
            "test_plays": parts["test"],
            "train_fraction": train_fraction,
            "seed": seed,
            "items": {},
        }
    }
    out["validation"] = [
        {"play": play, "text": document} for play in parts["test"] for document in held[play]
    ]
    out["manifest"]["items"]["validation"] = len(out["validation"])
    for task, make in (("next_line", next_line_items), ("speaker", speaker_items)):
        for part, wanted in (("train", train_items), ("test", test_items)):
            items = [item for play in parts[part] for item in make(speeches(held[play]), rng)]
            rng.shuffle(items)
            out[f"{task}_{part}"] = items[:wanted]
            out["manifest"]["items"][f"{task}_{part}"] = len(items[:wanted])
    return out
