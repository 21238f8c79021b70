"""Mo-LoRA fine-tuning of a dense Llama (adamoe-finetune --method mo-lora) as users launch it:
ZeRO-2 under torchrun and ZeRO-3 under the deepspeed launcher on 2 CPU processes, against one
process with the same global batch; many null experts leave LoRA experts without rows on a
rank; only the adapters are written, and they load on a fresh base with the same logits."""

from __future__ import annotations

import json
import os

import pytest
import torch

from tests.deepspeed.finetune_runs import STEPS, run_finetune
from tests.hf_models import save_standard_tokenizer
from tests.runs import REPO

pytestmark = pytest.mark.distributed


def _llama_config():
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        bos_token_id=1,
        eos_token_id=2,
    )


@pytest.fixture(scope="module")
def llama_and_data(tmp_path_factory):
    from transformers import LlamaForCausalLM

    from megatron_adamoe.data.corpus import synthetic_documents

    root = tmp_path_factory.mktemp("mo_lora")
    save_standard_tokenizer(root / "model", "fast")
    torch.manual_seed(0)
    LlamaForCausalLM(_llama_config()).save_pretrained(root / "model")
    with open(root / "train.jsonl", "w") as handle:
        for text in synthetic_documents(120, seed=3):
            handle.write(json.dumps({"text": text}) + "\n")
    return root


def test_mo_lora_under_zero2_and_zero3_trains_as_one_process_does(llama_and_data):
    from transformers import LlamaForCausalLM

    from megatron_adamoe.adapters import load_mo_lora

    root = llama_and_data
    # m = 28 null experts at k = 2: most picks are null, so LoRA experts go without rows.
    method = ["--method", "mo-lora", "--mo-lora-null-experts", "28", "--lora-dropout", "0"]
    config = os.path.join(REPO, "configs/deepspeed/zero{}.json")
    runs = {
        "zero2": run_finetune(root, "zero2", "torchrun", *method, "--deepspeed", config.format(2)),
        "zero3": run_finetune(root, "zero3", "deepspeed", *method, "--deepspeed", config.format(3)),
        "single": run_finetune(
            root, "single", "python", *method, "--gradient-accumulation-steps", "2"
        ),
    }
    losses = {name: [r["loss"] for r in records] for name, (_, records) in runs.items()}
    assert all(len(values) == STEPS for values in losses.values()), losses
    for name in ("zero2", "zero3"):
        assert losses[name] == pytest.approx(losses["single"], rel=1e-3), (name, losses)
    for name, (out, records) in runs.items():
        assert sum(r["empty_expert_calls"] for r in records) > 0, name
        assert all(0 <= load <= 2 and r["aux_loss"] > 0 for r in records for load in r["load"])
        assert sorted(os.listdir(out)) == ["mo_lora_adapters.safetensors", "mo_lora_config.json"]
    tokens = torch.randint(4, 120, (2, 16), generator=torch.Generator().manual_seed(0))
    logits = {}
    for name, (out, _) in runs.items():
        model = load_mo_lora(LlamaForCausalLM.from_pretrained(root / "model"), str(out)).eval()
        with torch.no_grad():
            logits[name] = model(tokens).logits
    base = LlamaForCausalLM.from_pretrained(root / "model").eval()
    with torch.no_grad():
        assert not torch.allclose(logits["single"], base(tokens).logits)  # the adapters act
    for name in ("zero2", "zero3"):
        torch.testing.assert_close(logits[name], logits["single"], rtol=1e-3, atol=1e-3)
