"""Hugging Face modeling of an AdaMoE causal LM: a Mixtral-style decoder with null experts.

Standalone (copied into exported model directories, loaded with ``trust_remote_code=True``): it
imports torch and only public transformers names (``PreTrainedModel``, ``GenerationMixin``,
``DynamicCache``, ``MoeCausalLMOutputWithPast``), so it does not break with transformers' internals.

Each MoE block's router scores E true + Z null experts and picks K over all of them; a token's
null picks never reach an expert: the expert loop visits true expert ids only. The math equals
Megatron-Core's AdaMoE layer (megatron_adamoe.ops.routing), checked by tests/convert/.

Shape legend: B batch, S sequence, T tokens (B*S), H hidden, E true experts, X = E + Z all
experts, K picks per token.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import torch.nn.functional as F
import transformers
from torch import nn
from transformers import DynamicCache, GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import MoeCausalLMOutputWithPast

from .configuration_adamoe import AdaMoEHFConfig

_ROUTER_DTYPES = {None: None, "float32": torch.float32, "float64": torch.float64}

# The decoding cache's keyword: ``cache`` from transformers 5.24 (``generate()`` passes it so and
# reads it back from the output), ``past_key_values`` before. The forwards take either.
_CACHE_FIELD = (
    "cache"
    if "cache" in {f.name for f in dataclasses.fields(MoeCausalLMOutputWithPast)}
    else "past_key_values"
)


def _one_cache(cache, past_key_values):
    if cache is not None and past_key_values is not None:
        raise ValueError("cache/past_key_values: pass the decoding cache under one name only")
    return cache if cache is not None else past_key_values


def route_tokens(
    logits_TX: torch.Tensor,
    topk: int,
    num_true_experts: int,
    weight_norm: str,
    scaling_factor: Optional[float] = None,
    selection_bias_X: Optional[torch.Tensor] = None,
    topp_threshold: Optional[float] = None,
):
    """Top-k (or top-p) over true + null experts. Returns (indices_TK, weights_TK,
    identity_weight_T, used_TK): ``used_TK`` marks the picks taken (all of them under top-k).

    p = softmax over all X logits, S a token's picks. ``selection_bias_X`` is added to the logits
    to choose S only. Top-p: the shortest prefix of the k best, by q = softmax(logits + bias),
    whose q-mass reaches the threshold. Weights of the true picks: ``true_experts``
    p_i / sum_{S, true} p_j; ``all_selected`` p_i / sum_S p_j; ``none`` p_i. Null picks get weight
    0. The identity-null weight is the null picks' share of the selected mass (``true_experts``,
    ``all_selected``) or their raw mass (``none``). (The same operations as
    megatron_adamoe.ops.routing, which a test checks.)
    """
    stock = selection_bias_X is None and topp_threshold is None
    used_TK = None
    if not stock:
        selection_TX = logits_TX.float()
        if selection_bias_X is not None:
            selection_TX = selection_TX + selection_bias_X.float()
        top_TK, chosen_TK = torch.topk(selection_TX, k=topk, dim=1)
        if topp_threshold is not None:
            q_TK = torch.exp(top_TK - torch.logsumexp(selection_TX, dim=-1, keepdim=True))
            used_TK = (q_TK.cumsum(dim=-1) - q_TK) < topp_threshold
    if weight_norm == "none":
        scores_TX = torch.softmax(logits_TX, dim=-1, dtype=torch.float32).type_as(logits_TX)
        if stock:
            weights_TK, indices_TK = torch.topk(scores_TX, k=topk, dim=1)
        else:
            indices_TK = chosen_TK
            weights_TK = scores_TX.gather(1, indices_TK)
            if used_TK is not None:
                weights_TK = weights_TK * used_TK
        is_null_TK = indices_TK >= num_true_experts
        identity_weight_T = (weights_TK * is_null_TK).sum(dim=-1)
    else:
        if stock:
            top_logits_TK, indices_TK = torch.topk(logits_TX, k=topk, dim=1)
        else:
            indices_TK = chosen_TK
            top_logits_TK = logits_TX.gather(1, indices_TK)
            if used_TK is not None:
                top_logits_TK = top_logits_TK.masked_fill(~used_TK, float("-inf"))
        is_null_TK = indices_TK >= num_true_experts
        selected_TK = torch.softmax(top_logits_TK, dim=-1, dtype=torch.float32).type_as(logits_TX)
        identity_weight_T = (selected_TK * is_null_TK).sum(dim=-1)
        if weight_norm == "all_selected":
            weights_TK = selected_TK
        else:  # renormalise over the true picks; an all-null token gets no true weight
            dropped_TK = is_null_TK if used_TK is None else is_null_TK | ~used_TK
            masked_TK = top_logits_TK.masked_fill(dropped_TK, float("-inf"))
            all_null_T1 = dropped_TK.all(dim=-1, keepdim=True)
            masked_TK = torch.where(all_null_T1, torch.zeros_like(masked_TK), masked_TK)
            weights_TK = torch.softmax(masked_TK, dim=-1, dtype=torch.float32).type_as(logits_TX)
    weights_TK = weights_TK.masked_fill(is_null_TK, 0.0)
    if used_TK is not None:
        weights_TK = weights_TK.masked_fill(~used_TK, 0.0)
    if scaling_factor:
        weights_TK = weights_TK * scaling_factor
        identity_weight_T = identity_weight_T * scaling_factor
    if used_TK is None:
        used_TK = torch.ones_like(indices_TK, dtype=torch.bool)
    return indices_TK, weights_TK, identity_weight_T, used_TK


def load_balancing_loss(
    logits_TX: torch.Tensor,
    picked_TX: torch.Tensor,
    topk: int,
    num_null_experts: int,
    target_load: Optional[float] = None,
    valid_T: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """The null-aware load-balancing loss of one MoE layer (paper Eq. 6), coefficient 1, over
    the (valid) tokens of the batch: X * sum_i f~_i P_i, f the share of the k*T picks per expert
    with the nulls averaged into one bucket, P the mean router probability. With
    ``target_load`` tau each term is divided by X times the expert's target share (tau / (k n) per
    true expert, (1 - tau / k) / m per null), so the null bucket is pulled to the target's share
    (megatron_adamoe.ops.losses; the same operations, which a test checks)."""
    scores_TX = torch.softmax(logits_TX, dim=-1, dtype=torch.float32)
    if valid_T is not None:
        scores_TX, picked_TX = scores_TX[valid_T], picked_TX[valid_T]
    num_tokens, num_experts = scores_TX.shape
    counts_X = picked_TX.sum(dim=0)
    if num_null_experts:
        num_true = num_experts - num_null_experts
        counts_X = counts_X.float()
        counts_X = torch.cat(
            [counts_X[:num_true], counts_X[num_true:].mean().expand(num_null_experts)]
        )
    if target_load is not None:
        num_true = num_experts - num_null_experts
        true_weight = topk * num_true / (num_experts * target_load)
        null_weight = topk * num_null_experts / (num_experts * (topk - target_load))
        counts_X = counts_X * torch.tensor(
            [true_weight] * num_true + [null_weight] * num_null_experts, device=counts_X.device
        )
    return torch.sum(scores_TX.sum(dim=0) * counts_X) * (
        num_experts / (topk * num_tokens * num_tokens)
    )


class AdaMoERMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


class AdaMoERotaryEmbedding(nn.Module):
    """Rotary position embedding over the whole head dimension (halves rotated, not pairs)."""

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        self.head_dim, self.theta = head_dim, theta

    @torch.no_grad()
    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype):
        # Computed per call (a buffer would stay on the meta device after a meta-device load).
        exponents = (
            torch.arange(0, self.head_dim, 2, dtype=torch.float32, device=position_ids.device)
            / self.head_dim
        )
        inv_freq = 1.0 / (self.theta**exponents)
        freqs = position_ids[..., None].float() * inv_freq  # [B, S, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _apply_rotary(x_BNSD: torch.Tensor, cos_BSD: torch.Tensor, sin_BSD: torch.Tensor):
    cos, sin = cos_BSD.unsqueeze(1), sin_BSD.unsqueeze(1)
    return x_BNSD * cos + _rotate_half(x_BNSD) * sin


class AdaMoEAttention(nn.Module):
    def __init__(self, config: AdaMoEHFConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        hidden = config.hidden_size
        self.q_proj = nn.Linear(hidden, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, hidden, bias=False)

    def forward(self, x_BSH, cos_sin, mask_B1SS, cache: Optional[DynamicCache]):
        batch, seq, _ = x_BSH.shape
        q = self.q_proj(x_BSH).view(batch, seq, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x_BSH).view(batch, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x_BSH).view(batch, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = _apply_rotary(q, *cos_sin), _apply_rotary(k, *cos_sin)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        groups = self.num_heads // self.num_kv_heads
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        scores = torch.matmul(q, k.transpose(2, 3)) / self.head_dim**0.5 + mask_B1SS
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        out = torch.matmul(probs, v).transpose(1, 2).reshape(batch, seq, -1)
        return self.o_proj(out)


class AdaMoEMLP(nn.Module):
    """SwiGLU feed-forward: w2(silu(w1 x) * w3 x). Experts and dense layers alike."""

    def __init__(self, hidden_size: int, ffn_size: int):
        super().__init__()
        self.w1 = nn.Linear(hidden_size, ffn_size, bias=False)
        self.w2 = nn.Linear(ffn_size, hidden_size, bias=False)
        self.w3 = nn.Linear(hidden_size, ffn_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class AdaMoESparseMoeBlock(nn.Module):
    """Router over E true + Z null experts, and the true experts. Every expert runs each forward,
    on the rows routed to it (possibly none: an empty matmul), so every data-parallel rank uses
    the same parameters whatever the routing (DDP, ZeRO-2/3); null picks reach no expert."""

    def __init__(self, config: AdaMoEHFConfig):
        super().__init__()
        self.num_true_experts = config.num_local_experts
        self.num_null_experts = config.num_null_experts
        self.topk = config.num_experts_per_tok
        self.weight_norm = config.router_weight_norm
        self.scaling_factor = config.router_topk_scaling_factor
        self.topp_threshold = config.router_topp_threshold if config.router_mode == "topp" else None
        self.identity_nulls = config.null_expert_type == "identity"
        self.router_dtype = _ROUTER_DTYPES[config.router_dtype]
        num_all = config.num_local_experts + config.num_null_experts
        self.gate = nn.Linear(config.hidden_size, num_all, bias=False)
        self.experts = nn.ModuleList(
            AdaMoEMLP(config.hidden_size, config.moe_intermediate_size)
            for _ in range(config.num_local_experts)
        )
        if config.router_expert_bias:  # aux-loss-free balancing of the true experts
            self.register_buffer("expert_bias", torch.zeros(config.num_local_experts))
        if config.router_null_bias:  # the target-load controller's null bias
            self.register_buffer("null_bias", torch.zeros(1))
        # Training statistics, plain attributes (never loaded, never left uninitialised):
        # [true picks, tokens] since the controller's last step, and the last forward's counts.
        self.step_counts = None
        self.last_counts = (0.0, 0.0, 0.0)

    def selection_bias(self) -> Optional[torch.Tensor]:
        """[X] bias added to the logits to choose experts (as the Megatron router's)."""
        expert_bias, null_bias = (
            getattr(self, "expert_bias", None),
            getattr(self, "null_bias", None),
        )
        if expert_bias is None and null_bias is None:
            return None
        device = self.gate.weight.device
        true_E = (
            expert_bias
            if expert_bias is not None
            else torch.zeros(self.num_true_experts, device=device)
        )
        if not self.num_null_experts:
            return true_E
        null_Z = null_bias if null_bias is not None else torch.zeros(1, device=device)
        return torch.cat([true_E.float(), null_Z.float().expand(self.num_null_experts)])

    def forward(self, x_BSH: torch.Tensor):
        """(output [B, S, H], router logits [T, X], picks [T, X] bool)."""
        x_TH = x_BSH.reshape(-1, x_BSH.size(-1))
        dtype = self.router_dtype or x_TH.dtype
        logits_TX = F.linear(x_TH.to(dtype), self.gate.weight.to(dtype))
        indices_TK, weights_TK, identity_weight_T, used_TK = route_tokens(
            logits_TX,
            self.topk,
            self.num_true_experts,
            self.weight_norm,
            self.scaling_factor,
            self.selection_bias(),
            self.topp_threshold,
        )
        out_TH = torch.zeros_like(x_TH)
        taken_TK = torch.where(used_TK, indices_TK, -1)
        for expert_id, expert in enumerate(self.experts):  # true ids only: nulls never run
            token_ids, slots = torch.nonzero(taken_TK == expert_id, as_tuple=True)
            weight_T1 = weights_TK[token_ids, slots].unsqueeze(-1)
            out_TH.index_add_(0, token_ids, (expert(x_TH[token_ids]) * weight_T1).to(x_TH.dtype))
        if self.identity_nulls:
            out_TH = out_TH + (identity_weight_T.unsqueeze(-1) * x_TH).to(x_TH.dtype)
        picked_TX = torch.zeros_like(logits_TX, dtype=torch.bool).scatter(1, indices_TK, used_TK)
        if self.training and torch.is_grad_enabled():
            self._count(picked_TX[:, : self.num_true_experts])
        return out_TH.view_as(x_BSH), logits_TX, picked_TX

    @torch.no_grad()
    def _count(self, picked_TE: torch.Tensor) -> None:
        """Training statistics: for logging, and for the load controller's step."""
        picks, tokens = picked_TE.sum().float(), float(picked_TE.size(0))
        empty = float(bool((picked_TE.sum(dim=0) == 0).any()))
        self.last_counts = (float(picks), tokens, empty)
        if getattr(self, "null_bias", None) is not None:
            counts = torch.tensor([float(picks), tokens], dtype=torch.float64)
            self.step_counts = counts if self.step_counts is None else self.step_counts + counts


class AdaMoEDecoderLayer(nn.Module):
    def __init__(self, config: AdaMoEHFConfig, layer_idx: int):
        super().__init__()
        self.self_attn = AdaMoEAttention(config, layer_idx)
        self.is_moe = layer_idx in config.moe_layers
        if self.is_moe:
            self.block_sparse_moe = AdaMoESparseMoeBlock(config)
        else:
            self.mlp = AdaMoEMLP(config.hidden_size, config.intermediate_size)
        self.input_layernorm = AdaMoERMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = AdaMoERMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x_BSH, cos_sin, mask_B1SS, cache):
        """(hidden states, (router logits [T, X], picks [T, X]) or None for a dense layer)."""
        x_BSH = x_BSH + self.self_attn(self.input_layernorm(x_BSH), cos_sin, mask_B1SS, cache)
        normed = self.post_attention_layernorm(x_BSH)
        if not self.is_moe:
            return x_BSH + self.mlp(normed), None
        mlp_out, logits_TX, picked_TX = self.block_sparse_moe(normed)
        return x_BSH + mlp_out, (logits_TX, picked_TX)


class AdaMoEPreTrainedModel(PreTrainedModel):
    config_class = AdaMoEHFConfig
    base_model_prefix = "model"
    _no_split_modules = ["AdaMoEDecoderLayer"]
    _supports_cache_class = True

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        for param in module.parameters(recurse=False):
            if getattr(param, "_is_hf_initialized", False):
                continue  # loaded from a checkpoint
            if isinstance(module, AdaMoERMSNorm):
                param.fill_(1.0)
            else:
                param.normal_(0.0, std)


class AdaMoEModel(AdaMoEPreTrainedModel):
    def __init__(self, config: AdaMoEHFConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            AdaMoEDecoderLayer(config, i) for i in range(config.num_hidden_layers)
        )
        self.norm = AdaMoERMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = AdaMoERotaryEmbedding(config.head_dim, config.rope_theta)
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        cache=None,
        inputs_embeds=None,
        use_cache=None,
        past_key_values=None,
        **kwargs,
    ):
        """Returns (hidden_states [B, S, H], cache, (router logits, picks) per MoE layer).

        ``cache`` (``past_key_values`` before transformers 5.24): the decoding cache, either name.
        Positions of new tokens follow the cache length (transformers' ``cache_position``, if
        passed in ``kwargs``, says the same and is not needed). ``attention_mask``: [B, keys],
        1 = attend; padded (left-padded) batches give ``position_ids`` as generate() does."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("input_ids/inputs_embeds must be given, exactly one of them")
        if attention_mask is not None and attention_mask.dim() != 2:
            raise ValueError(
                f"attention_mask (shape {tuple(attention_mask.shape)}) must be 2-D "
                "[batch, keys]; pass the tokenizer's mask"
            )
        x_BSH = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        cache = _one_cache(cache, past_key_values)
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None:
            cache = DynamicCache()
        past = cache.get_seq_length() if cache is not None else 0
        batch, seq = x_BSH.shape[:2]
        cache_position = torch.arange(past, past + seq, device=x_BSH.device)
        if position_ids is None:
            position_ids = cache_position.unsqueeze(0).expand(batch, -1)
        mask_B1SS = _causal_mask(attention_mask, cache_position, past + seq, batch, x_BSH.dtype)
        cos_sin = self.rotary_emb(position_ids, x_BSH.dtype)
        routing = []
        for layer in self.layers:
            x_BSH, layer_routing = layer(x_BSH, cos_sin, mask_B1SS, cache if use_cache else None)
            if layer_routing is not None:
                routing.append(layer_routing)
        return self.norm(x_BSH), (cache if use_cache else None), routing


def _causal_mask(attention_mask, cache_position, num_keys: int, batch: int, dtype):
    """Additive mask [B, 1, S, num_keys]: key j visible to query at position i iff j <= i and
    ``attention_mask`` (when given, [B, num_keys], 1 = keep) keeps j."""
    key_positions = torch.arange(num_keys, device=cache_position.device)
    allowed = key_positions[None, :] <= cache_position[:, None]  # [S, keys]
    allowed = allowed[None, None].expand(batch, 1, -1, -1)
    if attention_mask is not None:
        keep = attention_mask[:, None, None, :num_keys].bool()
        allowed = allowed & keep
    mask = torch.zeros(allowed.shape, dtype=dtype, device=cache_position.device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)


class AdaMoEForCausalLM(AdaMoEPreTrainedModel, GenerationMixin):
    accepts_loss_kwargs = False  # the loss is a per-batch mean (the Trainer scales it for GA)

    # transformers 5 maps tied parameters to their source; 4.x lists them.
    if int(transformers.__version__.split(".")[0]) >= 5:
        _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    else:
        _tied_weights_keys = ["lm_head.weight"]

    def __init__(self, config: AdaMoEHFConfig):
        super().__init__(config)
        self.model = AdaMoEModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        cache=None,
        inputs_embeds=None,
        labels=None,
        use_cache=None,
        logits_to_keep=0,
        past_key_values=None,
        output_router_logits=None,
        **kwargs,
    ):
        """As Mixtral's: with ``output_router_logits`` (default: the config's) the output carries
        each MoE layer's router logits and ``aux_loss``, the sum over MoE layers of the
        null-aware load-balancing loss, which is added to ``loss`` times
        ``router_aux_loss_coef`` when ``labels`` are given."""
        output_router_logits = (
            self.config.output_router_logits
            if output_router_logits is None
            else output_router_logits
        )
        hidden_BSH, cache, routing = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=_one_cache(cache, past_key_values),
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
        )
        if logits_to_keep:
            hidden_BSH = hidden_BSH[:, -logits_to_keep:]
        logits = self.lm_head(hidden_BSH)
        loss = aux_loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(),
                labels[:, 1:].flatten().to(logits.device),
                ignore_index=-100,
            )
        if output_router_logits and routing:
            aux_loss = self.load_balancing_loss(routing, attention_mask)
            if loss is not None:
                loss = loss + self.config.router_aux_loss_coef * aux_loss.to(loss.device)
        return MoeCausalLMOutputWithPast(
            loss=loss,
            aux_loss=aux_loss,
            logits=logits,
            **{_CACHE_FIELD: cache},
            router_logits=tuple(logits_TX for logits_TX, _ in routing)
            if output_router_logits
            else None,
        )

    def load_balancing_loss(self, routing, attention_mask=None) -> torch.Tensor:
        """Sum over MoE layers of each layer's null-aware loss (coefficient 1), over the tokens
        ``attention_mask`` keeps."""
        config = self.config
        valid_T = None if attention_mask is None else attention_mask.reshape(-1).bool()
        targets = config.router_target_load
        if not isinstance(targets, list):
            targets = [targets] * len(routing)
        total = 0.0
        for (logits_TX, picked_TX), target in zip(routing, targets):
            if valid_T is not None and valid_T.numel() != logits_TX.size(0):
                valid_T = None  # a cached step: the mask covers past tokens too
            total = total + load_balancing_loss(
                logits_TX,
                picked_TX,
                config.num_experts_per_tok,
                config.num_null_experts,
                target,
                valid_T,
            )
        return total
