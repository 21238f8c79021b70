"""The standalone HF model files: config validation (pinned), the MoE block against a dense
per-token loop, cached generation, and the Megatron <-> HF tensor layouts. (Its routing and loss
are generated copies of ops: tests/unit/test_standalone.py.)"""

from __future__ import annotations

import pytest
import torch

from megatron_adamoe.hf.configuration_adamoe import AdaMoEHFConfig
from megatron_adamoe.hf.mapping import ModelShape, merge_qkv, split_qkv
from megatron_adamoe.hf.modeling_adamoe import AdaMoESparseMoeBlock

SMALL = dict(
    vocab_size=32,
    hidden_size=16,
    intermediate_size=24,
    moe_intermediate_size=8,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    num_local_experts=4,
    num_null_experts=4,
    num_experts_per_tok=3,
)


@pytest.mark.parametrize(
    "field,value,message",
    [
        (
            "null_expert_type",
            "one",
            "null_expert_type ('one') must be one of ('zero', 'identity'); use 'zero' (paper "
            "default) or 'identity'",
        ),
        (
            "router_weight_norm",
            "sum",
            "router_weight_norm ('sum') must be one of ('true_experts', "
            "'all_selected', 'none'); use 'true_experts' (the paper's choice)",
        ),
        (
            "num_experts_per_tok",
            9,
            "num_experts_per_tok (9) must be an integer in [1, num_local_experts + "
            "num_null_experts = 8]; lower it or add null experts (k counts picks over true and "
            "null experts)",
        ),
        (
            "num_null_experts",
            -1,
            "num_null_experts (-1) must be an integer >= 0; use 0 for plain top-k routing",
        ),
        (
            "moe_layers",
            [0, 2],
            "moe_layers ([0, 2]) must list layer indices in [0, 2); fix config.json",
        ),
        (
            "num_key_value_heads",
            3,
            "num_key_value_heads (3) must divide num_attention_heads (4); fix config.json",
        ),
        (
            "router_dtype",
            "bfloat16",
            "router_dtype ('bfloat16') must be one of (None, 'float32', "
            "'float64'); fix config.json",
        ),
    ],
)
def test_config_rejects_bad_values_with_one_line(field, value, message):
    with pytest.raises(ValueError) as info:
        AdaMoEHFConfig(**{**SMALL, field: value})
    assert str(info.value) == message


@pytest.mark.parametrize("null_type", ["zero", "identity"])
def test_moe_block_equals_a_dense_per_token_loop(null_type):
    config = AdaMoEHFConfig(**{**SMALL, "null_expert_type": null_type})
    torch.manual_seed(0)
    block = AdaMoESparseMoeBlock(config)
    for param in block.parameters():
        torch.nn.init.normal_(param, std=0.5)
    x_BSH = torch.randn(2, 5, 16)
    out, _ = block(x_BSH)
    for t, x in enumerate(x_BSH.reshape(-1, 16)):  # the paper's per-token formula
        p = torch.softmax(block.gate.weight @ x, dim=-1)
        picks = torch.topk(p, 3).indices.tolist()
        true = [i for i in picks if i < 4]
        y = sum(
            (p[i] / sum(p[j] for j in true) * block.experts[i](x) for i in true), torch.zeros(16)
        )
        if null_type == "identity":
            y = y + sum(p[i] for i in picks if i >= 4) / sum(p[i] for i in picks) * x
        torch.testing.assert_close(out.reshape(-1, 16)[t], y, atol=1e-5, rtol=1e-5)


def test_qkv_layout_interleaves_query_groups():
    shape = ModelShape(
        num_layers=1,
        moe_layers=(0,),
        hidden_size=16,
        num_attention_heads=4,
        num_query_groups=2,
        head_dim=4,
        num_experts=4,
        tied_embeddings=False,
    )
    q, k, v = (torch.randn(rows, 16) for rows in (16, 8, 8))
    qkv = merge_qkv(q, k, v, shape)
    # Megatron's rows: [q heads 0,1; k0; v0; q heads 2,3; k1; v1], each head 4 rows
    expected = torch.cat([q[0:8], k[0:4], v[0:4], q[8:16], k[4:8], v[4:8]])
    assert torch.equal(qkv, expected)
    assert all(torch.equal(a, b) for a, b in zip(split_qkv(qkv, shape), (q, k, v)))


def _tiny_causal_lm(null_type: str, seed: int = 0):
    from megatron_adamoe.hf.modeling_adamoe import AdaMoEForCausalLM

    torch.manual_seed(seed)
    config = AdaMoEHFConfig(**{**SMALL, "vocab_size": 128, "null_expert_type": null_type})
    model = AdaMoEForCausalLM(config)
    for param in model.parameters():  # larger weights than the init: varied routing and tokens
        torch.nn.init.normal_(param, std=1.0)
    # float64: cached and uncached decoding then agree far below any argmax or top-k margin
    model = model.double().eval()
    model.generation_config.eos_token_id = None
    return model


@pytest.mark.parametrize("null_type", ["zero", "identity"])
def test_greedy_generate_with_cache_equals_without_cache(null_type):
    """32 new tokens, one prompt and left-padded batched prompts: the decoding cache must be
    taken under the keyword this transformers passes (``cache`` from 5.24)."""
    model = _tiny_causal_lm(null_type)
    prompt = torch.randint(4, 128, (1, 6), generator=torch.Generator().manual_seed(1))
    batch = torch.randint(4, 128, (3, 8), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(batch)
    mask[1, :3], mask[2, :5] = 0, 0  # left padding
    batch = batch.masked_fill(mask == 0, 0)
    for inputs in ({"input_ids": prompt}, {"input_ids": batch, "attention_mask": mask}):
        outputs = [
            model.generate(
                **inputs, max_new_tokens=32, do_sample=False, pad_token_id=0, use_cache=use_cache
            )
            for use_cache in (True, False)
        ]
        assert outputs[0].shape[1] == inputs["input_ids"].shape[1] + 32
        assert torch.equal(outputs[0], outputs[1])
        # Not a degenerate loop (which a broken cache could also repeat): varied new tokens.
        assert len(set(outputs[0][:, -32:].flatten().tolist())) > 8


def test_forward_takes_the_cache_under_either_keyword():
    from transformers import DynamicCache

    model = _tiny_causal_lm("zero")
    tokens = torch.randint(4, 128, (1, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        whole = model(tokens, use_cache=False).logits[:, -1]
        for keyword in ("cache", "past_key_values"):
            cache = DynamicCache()
            model(tokens[:, :-1], use_cache=True, **{keyword: cache})
            assert cache.get_seq_length() == 8
            step = model(tokens[:, -1:], use_cache=True, **{keyword: cache}).logits[:, -1]
            # (attention probabilities are computed in float32, as in Megatron)
            torch.testing.assert_close(step, whole, rtol=1e-4, atol=1e-4)
        with pytest.raises(ValueError, match="under one name only"):
            model(tokens, cache=DynamicCache(), past_key_values=DynamicCache())


def test_generate_with_kv_cache_and_left_padding_equals_each_prompt_alone():
    from megatron_adamoe.hf.modeling_adamoe import AdaMoEForCausalLM

    torch.manual_seed(0)
    model = AdaMoEForCausalLM(AdaMoEHFConfig(**{**SMALL, "null_expert_type": "identity"}))
    model.eval().generation_config.eos_token_id = None
    prompts = [torch.randint(4, 32, (1, 7)), torch.randint(4, 32, (1, 4))]
    alone = [model.generate(p, max_new_tokens=6, do_sample=False)[0, p.shape[1] :] for p in prompts]
    batch = torch.zeros(2, 7, dtype=torch.long)
    mask = torch.zeros(2, 7, dtype=torch.long)
    for row, prompt in enumerate(prompts):  # left padding
        batch[row, 7 - prompt.shape[1] :], mask[row, 7 - prompt.shape[1] :] = prompt[0], 1
    together = model.generate(
        batch, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0
    )[:, 7:]
    assert torch.equal(together[0], alone[0]) and torch.equal(together[1], alone[1])
    with torch.no_grad():
        no_cache = model(torch.cat([prompts[0], alone[0][None, :-1]], 1), use_cache=False).logits
    assert torch.equal(no_cache[0, -6:].argmax(-1), alone[0])  # cache and no cache agree
