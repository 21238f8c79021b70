"""tools/make_tasks.py's tasks: the held-out documents are exactly those Megatron's split keeps
out of training, speeches parse, every item's answer is the true one, fine-tuning and test items
come from different plays, the same seed gives the same files; bad settings are one line."""

from __future__ import annotations

import json
import random

from megatron_adamoe.data.tasks import build_tasks, held_out_plays, speeches
from tests.runs import REPO

PLAY = """ACT I. SCENE I. A room.

[Enter ORSINO and CURIO.]

ORSINO.
If music be the food of love, play on;
Give me excess of it, that, surfeiting,
The appetite may sicken and so die.

CURIO.
Will you go hunt, my lord?

[Exit.]

SIR TOBY.
What a plague means my niece, to take the death
"""


def test_held_out_documents_are_megatrons_validation_documents():
    from megatron.core.datasets.blended_megatron_dataset_config import (
        parse_and_normalize_split,
    )

    plays = [("a", [f"a{i}" for i in range(10)]), ("b", [f"b{i}" for i in range(7)]),
             ("c", [f"c{i}" for i in range(8)])]  # fmt: skip
    fraction = parse_and_normalize_split("96,4,0")[0]
    # Megatron's builder: the train split is documents [0, int(round(0.96 * 25))) = [0, 24)
    assert held_out_plays(plays, fraction) == {"c": ["c7"]}
    # int(round(12.5)) = 12 (round half to even, as Megatron's int(round(...)) gives)
    assert held_out_plays(plays, 0.5) == {
        "b": [f"b{i}" for i in range(2, 7)],
        "c": [f"c{i}" for i in range(8)],
    }


def test_speeches_keep_speakers_and_lines_and_drop_stage_directions():
    assert speeches([PLAY]) == [
        ("ORSINO", ["If music be the food of love, play on;",
                    "Give me excess of it, that, surfeiting,",
                    "The appetite may sicken and so die."]),
        ("CURIO", ["Will you go hunt, my lord?"]),
        ("SIR TOBY", ["What a plague means my niece, to take the death"]),
    ]  # fmt: skip


def _plays():
    rng = random.Random(3)
    cast = ["LEAR", "FOOL", "KENT", "EDGAR", "GONERIL"]
    plays = []
    for play in ("alpha", "beta", "gamma"):
        text = []
        for n in range(60):
            speaker = rng.choice(cast)
            lines = [f"{play} line {n}.{k} by {speaker}" for k in range(rng.randint(1, 4))]
            text += [f"{speaker}.", *lines, ""]
        plays.append((play, ["\n".join(text[i : i + 50]) for i in range(0, len(text), 50)]))
    return plays


def test_items_are_true_disjoint_by_play_and_deterministic():
    tasks = build_tasks(_plays(), train_fraction=0.34, train_items=50, test_items=30, seed=1)
    manifest = tasks["manifest"]
    assert set(manifest["train_plays"]).isdisjoint(manifest["test_plays"])
    for name in ("next_line_train", "next_line_test", "speaker_train", "speaker_test"):
        items = tasks[name]
        assert items and len(items) == manifest["items"][name]
        plays = manifest["train_plays" if name.endswith("train") else "test_plays"]
        for item in items:
            assert len(item["choices"]) == 4 == len(set(item["choices"]))
            right = item["choices"][item["answer"]]
            if name.startswith("next_line"):  # the true continuation, from the right play
                assert right.split(" line ")[0] in plays
                first, second = item["question"].split("\n")
                n, k = second.split(" line ")[1].split(" ")[0].split(".")
                assert right.startswith(f"{second.split(' line ')[0]} line {n}.{int(k) + 1} ")
            else:
                assert item["question"].startswith('Who says: "')
                assert item["question"].endswith(f' by {right.upper()}"?')  # the true speaker
    held = held_out_plays(_plays(), 0.34)
    assert tasks["validation"] == [
        {"play": play, "text": text} for play in manifest["test_plays"] for text in held[play]
    ]
    assert manifest["items"]["validation"] == len(tasks["validation"]) > 0
    assert not set(manifest["train_plays"]) & {record["play"] for record in tasks["validation"]}
    assert build_tasks(_plays(), 0.34, 50, 30, seed=1) == tasks


def test_the_tool_writes_the_directory_or_says_why_not(tmp_path, capsys):
    from tests.tools import load_tool

    tool = load_tool("make_tasks")
    assert (
        tool.main(["--input", "x.tar.gz", "--split", "100,0,0", "--out", str(tmp_path / "t")]) == 2
    )
    assert capsys.readouterr().err.strip() == (
        "error: split ('100,0,0') must be three weights train,valid,test with some documents "
        "outside train, e.g. 96,4,0"
    )
    (tmp_path / "t").mkdir()
    assert tool.main(["--input", "x.tar.gz", "--out", str(tmp_path / "t")]) == 2
    assert "must not exist yet" in capsys.readouterr().err
    # From plays: every task file, the validation text both ways, the manifest.
    tool.shakespeare_plays = lambda path: _plays()
    out = tmp_path / "tasks"
    assert tool.main(["--input", "x.tar.gz", "--split", "34,66,0", "--out", str(out)]) == 0
    want = build_tasks(_plays(), 0.34, 1000, 400, seed=0)
    for name in ("next_line_train", "next_line_test", "speaker_train", "speaker_test"):
        assert [json.loads(line) for line in open(out / f"{name}.jsonl")] == want[name]
    validation = [json.loads(line) for line in open(out / "validation.jsonl")]
    assert validation == want["validation"]
    text = (out / "validation.txt").read_text()
    assert text == "\n\n".join(record["text"] for record in validation)
    assert json.loads((out / "manifest.json").read_text())["split"] == "34,66,0"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t", "tasks"]  # nothing half-written


def test_shipped_task_yamls_prompt_as_fine_tuning_renders():
    """configs/tasks/*.yaml read make_tasks' test files and give lm-eval the prompt and choices
    fine-tuning trains on (the default template)."""
    import jinja2
    import yaml

    from megatron_adamoe.data.tasks import TASKS
    from megatron_adamoe.hf.finetune_data import DEFAULT_MC_TEMPLATE, render_choice

    record = {"question": 'Who says: "Come, go"?', "choices": ["Lear", "Kent"], "answer": 1}
    for task in TASKS:
        with open(f"{REPO}/configs/tasks/shakespeare_{task}.yaml") as handle:
            config = yaml.safe_load(handle)
        assert config["task"] == f"shakespeare_{task}"
        assert config["dataset_kwargs"]["data_files"]["test"] == (
            f"data/tasks/shakespeare/{task}_test.jsonl"
        )
        prompt, choices, answer = render_choice(record, "r", DEFAULT_MC_TEMPLATE)
        assert jinja2.Template(config["doc_to_text"]).render(**record) == prompt
        assert jinja2.Template(config["doc_to_target"]).render(**record) == str(answer)
        assert jinja2.Template(config["doc_to_choice"]).render(**record) == str(choices)
