"""Supervised fine-tuning data: prompt/completion and multiple-choice records, the loss on the
completion only, one line per bad record; the per-example loss against a plain loop; padding
left out of the MoE load counts."""

from __future__ import annotations

import json

import pytest
import torch

from megatron_adamoe.errors import OptionError
from megatron_adamoe.hf.finetune_data import (
    SupervisedDataset,
    is_supervised,
    per_example_lm_loss,
    read_examples,
)


class CharTokenizer:
    """One id per character (ord % 100 + 3); eos 2, pad 0: an independent, obvious tokenizer."""

    eos_token_id, pad_token_id = 2, 0

    def __call__(self, text, add_special_tokens=True):
        specials = [1] if add_special_tokens else []  # a BOS, as Llama's tokenizer adds one
        return {"input_ids": specials + [ord(c) % 100 + 3 for c in text]}


def _write(path, records):
    path.write_text(
        "".join(json.dumps(r) + "\n" if not isinstance(r, str) else r + "\n" for r in records)
    )
    return str(path)


def test_records_render_as_prompt_and_completion(tmp_path):
    data = _write(
        tmp_path / "d.jsonl",
        [
            {"prompt": "Q: 1+1?", "completion": " 2"},
            {"question": "Who speaks?", "choices": ["Lear", "Fool", "Kent"], "answer": 1},
            {"question": "Who?", "choices": ["a", "b"], "answer": "b"},
        ],
    )
    assert is_supervised([data])
    assert read_examples([data]) == [
        ("Q: 1+1?", " 2", f"{data}:1"),
        ("Who speaks?\nAnswer:", " Fool", f"{data}:2"),
        ("Who?\nAnswer:", " b", f"{data}:3"),
    ]
    lettered = read_examples([data], "{question}\n{choices}\nAnswer:")[1][0]
    assert lettered == "Who speaks?\nA. Lear\nB. Fool\nC. Kent\nAnswer:"
    assert not is_supervised([_write(tmp_path / "t.jsonl", [{"text": "plain"}])])


@pytest.mark.parametrize(
    "record, message",
    [
        (
            {"text": "x"},
            "must be a prompt/completion record or a question/choices/answer record "
            "(supervised data: every record of a file alike); fix that line",
        ),
        (
            {"prompt": "p", "completion": ""},
            "prompt and completion must be strings, the completion not empty; fix that line",
        ),
        (
            {"question": "q", "choices": ["only"], "answer": 0},
            "choices must be a list of at least 2 non-empty strings; fix that line",
        ),
        (
            {"question": "q", "choices": ["a", "b"], "answer": 2},
            "answer (2) must be a choice's index in [0, 1] or its text; fix that line",
        ),
        (
            {"question": "q", "choices": ["a", "b"], "answer": "c"},
            "answer ('c') must be a choice's index in [0, 1] or its text; fix that line",
        ),
        (
            '{"prompt": "p", oops}',
            "must be one JSON object per line: Expecting property name "
            "enclosed in double quotes at column 17; fix that line",
        ),
    ],
)
def test_a_bad_record_names_its_file_and_line(tmp_path, record, message):
    data = _write(tmp_path / "d.jsonl", [{"prompt": "fine", "completion": " yes"}, record])
    with pytest.raises(OptionError) as error:
        read_examples([data])
    assert str(error.value) == f"{data}:2 {message}"


def test_a_template_with_an_unknown_field_is_one_line(tmp_path):
    data = _write(tmp_path / "d.jsonl", [{"question": "q", "choices": ["a", "b"], "answer": 0}])
    with pytest.raises(OptionError) as error:
        read_examples([data], "{question} {context}")
    assert str(error.value) == (
        "mc_template ('{question} {context}') must use only {question} and {choices} "
        "(KeyError('context')); fix --mc-template"
    )


def test_rows_label_the_completion_only_truncate_prompts_and_pad_per_batch():
    tok = CharTokenizer()
    examples = [("abcdef", "XY", "f:1"), ("a", "Z", "f:2")]
    dataset = SupervisedDataset(examples, tok, seq_length=6, seed=0)
    rows = {tuple(dataset[i]["input_ids"]): dataset[i]["labels"] for i in range(2)}
    ids = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    # BOS + "abcdef" + "XY" + EOS is 10 > 6: the prompt keeps its last 3 tokens
    assert rows[tuple(ids("def") + ids("XY") + [2])] == [-100] * 3 + ids("XY") + [2]
    # the prompt with its BOS, the completion without
    assert rows[tuple([1] + ids("a") + ids("Z") + [2])] == [-100] * 2 + ids("Z") + [2]
    assert dataset.truncated == 1
    batch = dataset.collate([dataset[0], dataset[1]])
    assert batch["input_ids"].shape == (2, 6)
    short = int((batch["attention_mask"].sum(1) == 4).nonzero())
    assert batch["attention_mask"][short].tolist() == [1, 1, 1, 1, 0, 0]
    assert batch["labels"][short, 4:].tolist() == [-100, -100]
    assert batch["input_ids"][short, 4:].tolist() == [0, 0]
    with pytest.raises(OptionError) as error:
        SupervisedDataset([("p", "much too long", "f:7")], tok, seq_length=6, seed=0)
    assert str(error.value) == (
        "f:7 completion is 14 tokens, more than seq_length (6); raise --seq-length or shorten it"
    )


def test_per_example_loss_equals_a_loop_over_examples():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 7, 11, generator=generator)
    labels = torch.randint(0, 11, (3, 7), generator=generator)
    labels[0, :4] = -100  # a prompt
    labels[1, 5:] = -100  # padding
    labels[2, :2] = -100
    expected = []
    for b in range(3):
        terms = [
            -torch.log_softmax(logits[b, t - 1], -1)[labels[b, t]]
            for t in range(1, 7)
            if labels[b, t] != -100
        ]
        expected.append(sum(terms) / len(terms))
    torch.testing.assert_close(per_example_lm_loss(logits, labels), sum(expected) / 3)


def test_padding_is_left_out_of_the_moe_load_counts():
    from megatron_adamoe.hf import AdaMoEForCausalLM
    from tests.hf_models import one_layer_adamoe_config

    config = one_layer_adamoe_config()
    model = AdaMoEForCausalLM(config).train()
    tokens = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, 5:] = 0
    model(tokens, attention_mask=mask)
    block = model.model.layers[0].block_sparse_moe
    assert block.last_counts[1] == 13.0  # 8 + 5 tokens counted, not 16
    model(tokens)
    assert block.last_counts[1] == 16.0
