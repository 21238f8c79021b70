"""The exported model behaves as transformers' own models do (issue: a first-class transformers
model): packed sequences, gradient checkpointing, sdpa, the static cache, outputs as transformers
defines them, assisted decoding and shift_labels. Each is checked against the same model without
the feature (unpacked sequences, no checkpointing, eager attention, a dynamic cache, labels)."""

from __future__ import annotations

import pytest
import torch

from megatron_adamoe.hf import AdaMoEForCausalLM, AdaMoEHFConfig, modeling_adamoe

# What the installed transformers offers (the lock's has all; the declared lower bound, 4.46, has
# neither: the model then refuses these features in one line naming the version).
HAS_MASKS = modeling_adamoe.create_causal_mask is not None  # transformers >= 4.53
HAS_ATTENTION_INTERFACE = modeling_adamoe.ALL_ATTENTION_FUNCTIONS is not None  # >= 4.48

CONFIG = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=48,
    moe_intermediate_size=16,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    num_local_experts=4,
    num_null_experts=4,
    num_experts_per_tok=3,
    moe_layers=[0, 2],  # layer 1 dense
)


@pytest.fixture(scope="module", params=["zero", "identity"])
def saved(request, tmp_path_factory):
    """A random AdaMoE model (weights larger than the init: varied routing) saved as HF does."""
    torch.manual_seed(0)
    model = AdaMoEForCausalLM(AdaMoEHFConfig(**CONFIG, null_expert_type=request.param))
    for param in model.parameters():
        torch.nn.init.normal_(param, std=0.3)
    model.generation_config.eos_token_id = None
    directory = tmp_path_factory.mktemp(f"adamoe_{request.param}")
    model.save_pretrained(directory)
    return directory


def _load(directory, attention="eager", dtype=torch.float32):
    if attention == "sdpa" and not HAS_ATTENTION_INTERFACE:
        with pytest.raises(ValueError, match=r"^attn_implementation 'sdpa' needs transformers >= "):
            AdaMoEForCausalLM.from_pretrained(directory, attn_implementation=attention)
        pytest.skip("sdpa refused on this transformers (the refusal is what is checked)")
    model = AdaMoEForCausalLM.from_pretrained(directory, attn_implementation=attention)
    assert model.config._attn_implementation == attention
    return model.to(dtype).eval()


def _tokens(*shape, seed=0):
    return torch.randint(0, 64, shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_packed_sequences_equal_the_sequences_alone(saved, attention):
    """Padding-free packing (position_ids restart at 0, no mask): what
    DataCollatorWithFlattening and packed SFT produce. Tokens must not attend across the
    boundary (they did: logits off by 0.18)."""
    model = _load(saved, attention)
    first, second, third = _tokens(1, 5, seed=1), _tokens(1, 7, seed=2), _tokens(1, 4, seed=3)
    packed = torch.cat([first, second, third], dim=1)
    position_ids = torch.cat([torch.arange(5), torch.arange(7), torch.arange(4)])[None]
    if not HAS_MASKS:
        with pytest.raises(ValueError, match=r"^packed sequences \(position_ids that restart\)"):
            model(packed, position_ids=position_ids, use_cache=False)
        return
    with torch.no_grad():
        together = model(packed, position_ids=position_ids, use_cache=False).logits
        alone = torch.cat([model(t, use_cache=False).logits for t in (first, second, third)], 1)
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=0)


def test_sdpa_equals_eager_and_generates_the_same(saved):
    eager, sdpa = _load(saved, "eager", torch.float64), _load(saved, "sdpa", torch.float64)
    tokens = _tokens(2, 12)
    mask = torch.ones_like(tokens)
    mask[1, :4] = 0  # left padding
    with torch.no_grad():
        logits = [m(tokens, attention_mask=mask).logits for m in (eager, sdpa)]
    torch.testing.assert_close(logits[0][mask.bool()], logits[1][mask.bool()], atol=1e-5, rtol=0)
    generated = [
        m.generate(tokens, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0)
        for m in (eager, sdpa)
    ]
    assert torch.equal(generated[0], generated[1])


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_static_cache_generates_as_the_dynamic_cache(saved, attention):
    model = _load(saved, attention, torch.float64)
    tokens = _tokens(2, 8, seed=4)
    mask = torch.ones_like(tokens)
    mask[0, :3] = 0
    if not HAS_MASKS:  # transformers refuses it itself: the model does not claim static caches
        with pytest.raises(ValueError, match="static"):
            model.generate(tokens, attention_mask=mask, cache_implementation="static")
        return
    runs = [
        model.generate(
            tokens,
            attention_mask=mask,
            max_new_tokens=12,
            do_sample=False,
            pad_token_id=0,
            cache_implementation=cache,
        )
        for cache in ("static", "dynamic")
    ]
    assert torch.equal(runs[0], runs[1])
    assert len(set(runs[0][:, -12:].flatten().tolist())) > 4  # not a degenerate loop


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(saved, reentrant):
    """transformers' own mechanism (gradient_checkpointing_enable), with the router's aux loss
    in the loss: the recomputed layers give the same loss and every gradient."""
    tokens = _tokens(2, 10, seed=5)

    def loss_and_gradients(checkpointing: bool):
        model = _load(saved).train()
        if checkpointing:
            model.gradient_checkpointing_enable({"use_reentrant": reentrant})
            assert model.is_gradient_checkpointing
        out = model(tokens, labels=tokens, output_router_logits=True, use_cache=False)
        out.loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        return out.loss.detach(), out.aux_loss.detach(), grads

    loss, aux, grads = loss_and_gradients(False)
    loss_gc, aux_gc, grads_gc = loss_and_gradients(True)
    assert aux > 0 and torch.equal(aux, aux_gc) and torch.equal(loss, loss_gc)
    assert sorted(grads) == sorted(grads_gc) and any("gate" in name for name in grads)
    for name, grad in grads.items():
        torch.testing.assert_close(grads_gc[name], grad, atol=1e-6, rtol=1e-5)


def test_outputs_are_what_transformers_documents(saved):
    from transformers import AutoModel
    from transformers.modeling_outputs import MoeCausalLMOutputWithPast, MoeModelOutputWithPast

    import megatron_adamoe.hf  # noqa: F401  (registers the Auto classes)

    model = _load(saved)
    tokens = _tokens(2, 9, seed=6)
    with torch.no_grad():
        out = model(tokens, output_hidden_states=True, output_attentions=True)
        plain = model(tokens, use_cache=False, return_dict=False)
    assert isinstance(out, MoeCausalLMOutputWithPast)
    assert len(out.hidden_states) == 3 + 1 and all(h.shape == (2, 9, 32) for h in out.hidden_states)
    assert len(out.attentions) == 3 and all(a.shape == (2, 4, 9, 9) for a in out.attentions)
    torch.testing.assert_close(out.attentions[0].sum(-1), torch.ones(2, 4, 9))
    assert isinstance(plain, tuple) and torch.equal(plain[0], out.logits)
    base = AutoModel.from_pretrained(saved, attn_implementation="eager").eval()
    with torch.no_grad():
        hidden = base(tokens, output_router_logits=True)
    assert isinstance(hidden, MoeModelOutputWithPast)
    torch.testing.assert_close(hidden.last_hidden_state, out.hidden_states[-1])
    assert len(hidden.router_logits) == 2 and hidden.router_logits[0].shape == (18, 8)
    with torch.no_grad():
        tuple_out = base(tokens, return_dict=False)
    assert isinstance(tuple_out, tuple) and torch.equal(tuple_out[0], hidden.last_hidden_state)


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_assisted_decoding_with_full_outputs(saved, attention):
    model = _load(saved, attention)
    assistant = _load(saved, attention)
    for m in (model, assistant):  # an end token (transformers 4.46's assistant needs one)
        m.generation_config.eos_token_id = 0
    prompt = _tokens(1, 6, seed=7)
    plain = model.generate(prompt, max_new_tokens=8, do_sample=False)
    full = model.generate(
        prompt,
        max_new_tokens=8,
        do_sample=False,
        assistant_model=assistant,
        return_dict_in_generate=True,
        output_attentions=True,
        output_hidden_states=True,
    )
    assert torch.equal(full.sequences, plain) and full.hidden_states
    if attention == "eager":  # sdpa computes no probabilities: one None per layer, none kept
        assert full.attentions[0][0].shape[:2] == (1, 4)
    looked_up = model.generate(
        prompt, max_new_tokens=8, do_sample=False, prompt_lookup_num_tokens=3
    )
    assert torch.equal(looked_up, plain)


def test_shift_labels_loss_equals_the_labels_loss_on_the_shifted_data(saved):
    model = _load(saved)
    tokens = _tokens(2, 10, seed=8)
    labels = tokens.clone()
    labels[0, :3] = -100  # a prompt left out of the loss
    shifted = torch.cat([labels[:, 1:], torch.full((2, 1), -100)], dim=1)
    with torch.no_grad():
        expected = model(tokens, labels=labels).loss
        got = model(tokens, shift_labels=shifted).loss
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    assert not torch.equal(model(tokens, shift_labels=labels).loss, expected)  # not shifted again
