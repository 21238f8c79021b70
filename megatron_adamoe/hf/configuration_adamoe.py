"""Hugging Face configuration of an AdaMoE causal LM (a Mixtral-style decoder with null experts).

Standalone: this file and ``modeling_adamoe.py`` are copied into every exported model directory
and loaded with ``trust_remote_code=True``; they import only torch and public transformers names.
"""

from __future__ import annotations

from transformers import PretrainedConfig

NULL_EXPERT_TYPES = ("zero", "identity")
ROUTER_WEIGHT_NORMS = ("true_experts", "all_selected", "none")
ROUTER_DTYPES = (None, "float32", "float64")
ROUTER_MODES = ("topk", "topp")


class AdaMoEHFConfig(PretrainedConfig):
    """A Mixtral-style decoder whose MoE router scores ``num_local_experts`` true experts plus
    ``num_null_experts`` null experts and picks ``num_experts_per_tok`` over all of them.

    ``moe_layers`` lists the layers with an MoE block (default: all); the others have a dense
    SwiGLU MLP of ``intermediate_size``. ``null_expert_type``: ``zero`` nulls add nothing,
    ``identity`` nulls add ``s * x``. ``router_weight_norm``: how the selected weights are
    normalised (see ``modeling_adamoe.route_tokens``). ``router_dtype``: the dtype the router
    logits and weights are computed in (Megatron's ``moe_router_dtype``). ``router_mode``
    ``topk`` or ``topp`` (with ``router_topp_threshold``). ``router_expert_bias`` /
    ``router_null_bias``: the routers hold the selection biases of aux-loss-free balancing / the
    target-load controller (added to the logits to choose experts, never to weights);
    ``router_target_load``: the controller's target (a number or one per MoE layer), which the
    load-balancing loss's null share follows.

    Training: with ``output_router_logits`` the forward adds ``router_aux_loss_coef`` x the sum
    over MoE layers of each layer's null-aware load-balancing loss (paper Eq. 6) to the loss, the
    semantics of Megatron's per-layer ``moe_aux_loss_coeff``. (transformers' Mixtral applies its
    coefficient to one loss over all layers' routing together, about the per-layer mean: a Mixtral
    coefficient c is about c / (number of MoE layers) here.)
    """

    model_type = "adamoe"
    keys_to_ignore_at_inference = ["cache", "past_key_values"]

    def __init__(
        self,
        vocab_size: int = 32000,
        hidden_size: int = 4096,
        intermediate_size: int = 14336,
        moe_intermediate_size: int = 14336,
        num_hidden_layers: int = 32,
        num_attention_heads: int = 32,
        num_key_value_heads: int = 8,
        head_dim=None,
        max_position_embeddings: int = 4096,
        rms_norm_eps: float = 1e-5,
        rope_theta: float = 10000.0,
        num_local_experts: int = 8,
        num_null_experts: int = 8,
        num_experts_per_tok: int = 3,
        null_expert_type: str = "zero",
        router_weight_norm: str = "true_experts",
        router_topk_scaling_factor=None,
        router_dtype="float32",
        moe_layers=None,
        router_mode: str = "topk",
        router_topp_threshold=None,
        router_expert_bias: bool = False,
        router_null_bias: bool = False,
        router_target_load=None,
        output_router_logits: bool = False,
        router_aux_loss_coef: float = 0.01,
        hidden_act: str = "silu",
        initializer_range: float = 0.02,
        use_cache: bool = True,
        tie_word_embeddings: bool = False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=None,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.moe_intermediate_size = moe_intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.head_dim = head_dim or hidden_size // num_attention_heads
        self.max_position_embeddings = max_position_embeddings
        self.rms_norm_eps = rms_norm_eps
        self.rope_theta = rope_theta
        self.num_local_experts = num_local_experts
        self.num_null_experts = num_null_experts
        self.num_experts_per_tok = num_experts_per_tok
        self.null_expert_type = null_expert_type
        self.router_weight_norm = router_weight_norm
        self.router_topk_scaling_factor = router_topk_scaling_factor
        self.router_dtype = router_dtype
        self.moe_layers = list(range(num_hidden_layers)) if moe_layers is None else list(moe_layers)
        self.router_mode = router_mode
        self.router_topp_threshold = router_topp_threshold
        self.router_expert_bias = router_expert_bias
        self.router_null_bias = router_null_bias
        self.router_target_load = router_target_load
        self.output_router_logits = output_router_logits
        self.router_aux_loss_coef = router_aux_loss_coef
        self.hidden_act = hidden_act
        self.initializer_range = initializer_range
        self.use_cache = use_cache
        super().__init__(
            tie_word_embeddings=tie_word_embeddings,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            **kwargs,
        )
        self._validate_adamoe()

    def _validate_adamoe(self) -> None:
        def fail(name: str, rule: str, fix: str) -> None:
            raise ValueError(f"{name} ({getattr(self, name)!r}) must {rule}; {fix}")

        for name in (
            "num_hidden_layers",
            "hidden_size",
            "num_attention_heads",
            "num_local_experts",
            "num_experts_per_tok",
            "vocab_size",
        ):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                fail(name, "be a positive integer", "fix config.json")
        if not isinstance(self.num_null_experts, int) or self.num_null_experts < 0:
            fail("num_null_experts", "be an integer >= 0", "fix config.json")
        if self.num_experts_per_tok > self.num_local_experts + self.num_null_experts:
            fail(
                "num_experts_per_tok",
                "be <= num_local_experts + num_null_experts "
                f"({self.num_local_experts + self.num_null_experts})",
                "lower it",
            )
        if self.num_attention_heads % self.num_key_value_heads:
            fail(
                "num_key_value_heads",
                f"divide num_attention_heads ({self.num_attention_heads})",
                "fix config.json",
            )
        if self.null_expert_type not in NULL_EXPERT_TYPES:
            fail("null_expert_type", f"be one of {NULL_EXPERT_TYPES}", "fix config.json")
        if self.router_weight_norm not in ROUTER_WEIGHT_NORMS:
            fail("router_weight_norm", f"be one of {ROUTER_WEIGHT_NORMS}", "fix config.json")
        if self.router_dtype not in ROUTER_DTYPES:
            fail("router_dtype", f"be one of {ROUTER_DTYPES}", "fix config.json")
        if self.hidden_act != "silu":
            fail("hidden_act", "be 'silu' (SwiGLU experts)", "fix config.json")
        if any(not 0 <= i < self.num_hidden_layers for i in self.moe_layers):
            fail(
                "moe_layers",
                f"list layer indices in [0, {self.num_hidden_layers})",
                "fix config.json",
            )
        if self.router_mode not in ROUTER_MODES:
            fail("router_mode", f"be one of {ROUTER_MODES}", "fix config.json")
        if (self.router_mode == "topp") != (self.router_topp_threshold is not None) or (
            self.router_topp_threshold is not None and not 0 < self.router_topp_threshold <= 1
        ):
            fail(
                "router_topp_threshold",
                "be in (0, 1] exactly when router_mode is 'topp'",
                "fix config.json",
            )
        if self.router_null_bias and not self.num_null_experts:
            fail("router_null_bias", "be false without null experts", "fix config.json")
        target = self.router_target_load
        if target is not None:
            values = target if isinstance(target, list) else [target]
            limit = min(self.num_experts_per_tok, self.num_local_experts)
            if (
                not self.num_null_experts
                or any(not 0 < v < limit for v in values)
                or (isinstance(target, list) and len(target) != len(self.moe_layers))
            ):
                fail(
                    "router_target_load",
                    f"be in (0, {limit}) (one number, or one per MoE layer) with null experts",
                    "fix config.json",
                )
        if not isinstance(self.router_aux_loss_coef, (int, float)) or self.router_aux_loss_coef < 0:
            fail("router_aux_loss_coef", "be a number >= 0", "fix config.json")
