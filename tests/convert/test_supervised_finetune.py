"""adamoe-finetune on supervised records as a user runs it: multiple-choice and prompt/completion
records in one file, the loss of the first step equal to an independent computation (each example
alone, unpadded, the loss over its completion tokens, averaged over examples)."""

from __future__ import annotations

import json

import torch

from tests.hf_models import tiny_adamoe

RECORDS = [
    {"question": "Who speaks of the crown?", "choices": ["the king", "a fool"], "answer": 1},
    {"prompt": "my lord fears", "completion": " the storm."},
    {"question": "What does the queen love?", "choices": ["her ring", "the night"], "answer": 0},
    {"prompt": "this knave betrays his daughter and", "completion": " forgets a letter."},
]


def test_supervised_records_train_on_their_completions(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megatron_adamoe.data.corpus import synthetic_documents
    from megatron_adamoe.hf.finetune import main

    tiny_adamoe(tmp_path / "model", "\n".join(synthetic_documents(80, seed=0)))
    with open(tmp_path / "train.jsonl", "w") as handle:
        handle.writelines(json.dumps(record) + "\n" for record in RECORDS)
    status = main(
        ["--model", str(tmp_path / "model"), "--data", str(tmp_path / "train.jsonl"),
         "--output-dir", str(tmp_path / "out"), "--seq-length", "48", "--max-steps", "1",
         "--per-device-batch-size", "4", "--aux-loss-coef", "0", "--logging-steps", "1",
         "--metrics-file", str(tmp_path / "m.jsonl")]
    )  # fmt: skip
    assert status == 0
    logged = next(json.loads(line)["loss"] for line in open(tmp_path / "m.jsonl"))

    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "model")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "model", dtype=torch.float32).train()
    losses = []
    for record in RECORDS:
        if "prompt" in record:
            prompt, completion = record["prompt"], record["completion"]
        else:
            prompt = record["question"] + "\nAnswer:"
            completion = " " + record["choices"][record["answer"]]
        prompt_ids = tokenizer(prompt)["input_ids"]
        target = tokenizer(completion, add_special_tokens=False)["input_ids"]
        target = target + [tokenizer.eos_token_id]
        ids = torch.tensor([prompt_ids + target])
        with torch.no_grad():
            logits = model(ids).logits[0]
        start = len(prompt_ids)
        log_probs = torch.log_softmax(logits[start - 1 : -1], dim=-1)
        losses.append(-log_probs.gather(1, torch.tensor(target)[:, None]).mean())
    assert abs(logged - float(sum(losses) / len(losses))) < 1e-4
