"""The paper's workflow with the tokenizers Hugging Face models ship (a fast tokenizer.json, a
sentencepiece tokenizer.model): Mixtral -> mixtral-to-adamoe -> adamoe-finetune keeps the
tokenizer as it was, and the result reloads with AutoTokenizer as a standard transformers class
(no tokenizer code of ours goes along) and generates. (The project's own sentencepiece tokenizer
is the DeepSpeed tier's.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.conversion import convert
from tests.hf_models import save_standard_tokenizer, tiny_mixtral

TEXT = "the king speaks of the crown"


@pytest.fixture(scope="module", params=["fast", "sentencepiece"])
def tuned(request, tmp_path_factory):
    """(kind, Mixtral dir, converted dir, fine-tuned dir): 3 fine-tuning steps, in this
    process."""
    from megatron_adamoe.data.corpus import synthetic_documents
    from megatron_adamoe.hf.finetune import main as finetune

    root = tmp_path_factory.mktemp(f"tokenizer_{request.param}")
    tiny_mixtral(root / "mixtral", vocab_size=256)
    save_standard_tokenizer(root / "mixtral", request.param)
    convert(
        "mixtral-to-adamoe",
        "--hf",
        root / "mixtral",
        "--out",
        root / "ada",
        "--num-null-experts",
        "2",
        "--topk",
        "2",
    )
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in synthetic_documents(40, 5)))
    argv = ["--model", root / "ada", "--data", data, "--output-dir", root / "tuned"]
    argv += ["--seq-length", "32", "--max-steps", "3", "--logging-steps", "1"]
    assert finetune(list(map(str, argv))) == 0
    return request.param, root / "mixtral", root / "ada", root / "tuned"


def test_the_tokenizer_survives_conversion_and_fine_tuning(tuned):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import megatron_adamoe.hf  # noqa: F401  (with the package installed: no remote code at all)

    kind, mixtral, converted, finetuned = tuned
    expected = AutoTokenizer.from_pretrained(mixtral)(TEXT)["input_ids"]
    for directory in (converted, finetuned):
        tokenizer = AutoTokenizer.from_pretrained(directory)
        assert type(tokenizer).__module__.startswith("transformers."), type(tokenizer)
        assert tokenizer(TEXT)["input_ids"] == expected and len(expected) > 3
        assert not [name for name in os.listdir(directory) if name.startswith("tokenization_")]
    model = AutoModelForCausalLM.from_pretrained(finetuned).eval()
    prompt = tokenizer(TEXT, return_tensors="pt")
    generated = model.generate(**prompt, max_new_tokens=5, do_sample=False)
    assert generated.shape == (1, len(expected) + 5)
    assert tokenizer.decode(generated[0, len(expected) :])
    assert torch.isfinite(model(**prompt).logits).all()


_REMOTE = """
import sys
from transformers import AutoTokenizer
tokenizer = AutoTokenizer.from_pretrained(sys.argv[1], trust_remote_code=True)
assert not [m for m in sys.modules if m.startswith("megatron")]
print(type(tokenizer).__module__, tokenizer(sys.argv[2])["input_ids"])
"""


@pytest.mark.distributed
def test_without_the_package_the_tokenizer_is_a_standard_class(tuned, tmp_path):
    """A fresh interpreter with transformers only, stdin closed: no prompt waits; the model
    config is the only remote code (transformers 5 reads it before the tokenizer's own
    config), the tokenizer is transformers' own class."""
    from transformers import AutoTokenizer

    _, mixtral, _, finetuned = tuned
    done = subprocess.run(
        [sys.executable, "-c", _REMOTE, str(finetuned), TEXT],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env={**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules")},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    module, ids = done.stdout.strip().split(" ", 1)
    assert module.startswith("transformers.")
    assert json.loads(ids) == AutoTokenizer.from_pretrained(mixtral)(TEXT)["input_ids"]


def test_a_tokenizer_larger_than_the_model_is_one_line_before_training(tmp_path, capsys):
    """A 121-piece tokenizer on a 64-token model: the data's largest id is checked against the
    model's vocabulary before training (the embedding would fail inside the first step)."""
    from megatron_adamoe.data.corpus import synthetic_documents
    from megatron_adamoe.hf.finetune import main as finetune

    tiny_mixtral(tmp_path / "mixtral", vocab_size=64)
    save_standard_tokenizer(tmp_path / "mixtral", "fast")
    convert(
        "mixtral-to-adamoe",
        "--hf",
        tmp_path / "mixtral",
        "--out",
        tmp_path / "ada",
        "--num-null-experts",
        "2",
    )
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in synthetic_documents(80, 0)))
    argv = ["--model", tmp_path / "ada", "--data", data, "--output-dir", tmp_path / "tuned"]
    capsys.readouterr()
    assert finetune(list(map(str, argv + ["--seq-length", "32", "--max-steps", "1"]))) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith(
        "error: data token ids must be < the model's vocab_size (64); the tokenizer of "
        f"{tmp_path / 'ada'} gave 1"
    ) and line.endswith(": the tokenizer and the model disagree"), line
    assert not (tmp_path / "tuned").exists() and not (tmp_path / "tuned-checkpoints").exists()
