"""AdaMoE Mo-LoRA for dense Hugging Face causal LMs (paper section 4.1): every target linear of a
frozen model gets n LoRA experts and m null experts behind a router of its own; each token takes
top-k over n + m, and only its true picks compute.

    from megatron_adamoe.adapters import MoLoRAConfig, apply_mo_lora
    model = apply_mo_lora(AutoModelForCausalLM.from_pretrained(...), MoLoRAConfig(topk=2))
    loss = model(input_ids, labels=labels).loss + mo_lora_aux_loss(model)

A wrapped linear (``MoLoRALinear``) computes

    base(x) + sum over the token's true picks i of  g_i * B_i(A_i(dropout(x))) * alpha / r

with the routing and weight norms of ``megatron_adamoe.ops`` (``null_expert_topk_routing``): the
weights g come from softmax(router(x)) over n + m, normalised over the true picks by default (the
paper's option 2). B starts at zero, so the wrapped model starts equal to its base. Every expert
runs every step on the rows routed to it, possibly none, so data-parallel ranks (DDP, ZeRO-2/3)
touch the same parameters whatever their tokens choose.

Legend: T tokens, H input features, O output features, E true (LoRA) experts, X = E + null.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch
from torch import nn

from megatron_adamoe.errors import OptionError
from megatron_adamoe.ops.routing import null_expert_topk_routing
from megatron_adamoe.options.routing_rules import WEIGHT_NORMS, routing_violation

# The linears of the Llama, Mistral and Qwen2 families' decoder layers (the paper's targets).
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclasses.dataclass
class MoLoRAConfig:
    """Mo-LoRA settings; the defaults are the paper's (n = 4 experts of rank 8, alpha 16,
    dropout 0.05, aux coefficient 0.001); m and k are the paper's swept settings (here m = 4,
    k = 2). Checked on creation: a bad value is one ``OptionError`` line naming the field."""

    num_experts: int = 4
    num_null_experts: int = 4
    topk: int = 2
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    weight_norm: str = "true_experts"
    aux_loss_coef: float = 0.001
    target_modules: tuple = DEFAULT_TARGETS
    null_expert_type: str = "zero"
    # Routing settings Mo-LoRA keeps fixed (top-k over n + m, no target); named for the rules.
    router_mode: str = "topk"
    topp_threshold: Optional[float] = None
    target_load: Optional[float] = None

    def __post_init__(self) -> None:
        self.target_modules = tuple(self.target_modules)
        if self.null_expert_type == "identity":
            raise OptionError(
                "null_expert_type ('identity') must be 'zero' for Mo-LoRA: an identity null would "
                "add the input to a linear's output, which an adapter has no place for"
            )
        problem = routing_violation(self, "mo_lora", 1)
        if problem:
            raise OptionError(problem)
        for name in ("rank",):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise OptionError(f"{name} ({value!r}) must be a positive integer; e.g. 8")
        if not isinstance(self.alpha, (int, float)) or self.alpha <= 0:
            raise OptionError(f"alpha ({self.alpha!r}) must be > 0; e.g. 16 (scaling alpha / r)")
        if not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise OptionError(f"dropout ({self.dropout!r}) must be in [0, 1); e.g. 0.05")
        if not isinstance(self.aux_loss_coef, (int, float)) or self.aux_loss_coef < 0:
            raise OptionError(
                f"aux_loss_coef ({self.aux_loss_coef!r}) must be >= 0; 0 turns the loss off"
            )
        if self.router_mode != "topk" or self.topp_threshold is not None:
            raise OptionError(
                f"router_mode ({self.router_mode!r}) must be 'topk' for Mo-LoRA; top-p routing "
                "is for MoE models"
            )
        if self.target_load is not None:
            raise OptionError(
                f"target_load ({self.target_load!r}) must be unset for Mo-LoRA; the aux loss "
                "(aux_loss_coef) sets the load"
            )
        if not self.target_modules or not all(isinstance(t, str) for t in self.target_modules):
            raise OptionError(
                f"target_modules ({self.target_modules!r}) must name linears, e.g. "
                f"{list(DEFAULT_TARGETS)}"
            )
        assert self.weight_norm in WEIGHT_NORMS  # routing_violation checked it

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


class MoLoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus routed LoRA experts. Public contract: ``base`` (the frozen
    linear), ``router`` (``Linear(in, n + m, bias=False)``), ``lora_A`` / ``lora_B``
    (``ModuleList`` of n ``Linear(in, r)`` / ``Linear(r, out)``, no bias), ``scaling``
    (alpha / r), ``dropout`` (on each expert's input). ``last_router_logits``: the [T, X] router
    logits of the last forward (the aux loss reads them)."""

    def __init__(self, base: nn.Linear, config: MoLoRAConfig) -> None:
        super().__init__()
        self.base = base
        for parameter in base.parameters():
            parameter.requires_grad_(False)
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        n, x = config.num_experts, config.num_experts + config.num_null_experts
        self.router = nn.Linear(base.in_features, x, bias=False, **factory)
        self.lora_A = nn.ModuleList(
            nn.Linear(base.in_features, config.rank, bias=False, **factory) for _ in range(n)
        )
        self.lora_B = nn.ModuleList(
            nn.Linear(config.rank, base.out_features, bias=False, **factory) for _ in range(n)
        )
        self.scaling = config.scaling
        self.dropout = nn.Dropout(config.dropout)
        self.num_experts, self.topk, self.weight_norm = n, config.topk, config.weight_norm
        self.last_router_logits: Optional[torch.Tensor] = None
        self.last_expert_rows_E: Optional[torch.Tensor] = None  # rows each expert computed
        self.reset_adapter_parameters()

    def reset_adapter_parameters(self) -> None:
        """As LoRA initialises (and the authors' router): A and the router Kaiming-uniform,
        B zero."""
        nn.init.kaiming_uniform_(self.router.weight, a=math.sqrt(5))
        for lora_A, lora_B in zip(self.lora_A, self.lora_B):
            nn.init.kaiming_uniform_(lora_A.weight, a=math.sqrt(5))
            nn.init.zeros_(lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        output = self.base(x)
        x_TH = x.reshape(-1, x.size(-1))
        logits_TX = self.router(x_TH)
        self.last_router_logits = logits_TX
        routing = null_expert_topk_routing(
            logits_TX, self.topk, self.num_experts, weight_norm=self.weight_norm
        )
        self.last_expert_rows_E = routing.routing_map_TE.sum(0).detach()
        update_TO = x_TH.new_zeros(x_TH.size(0), self.base.out_features)
        for expert, (lora_A, lora_B) in enumerate(zip(self.lora_A, self.lora_B)):
            rows = routing.routing_map_TE[:, expert].nonzero().squeeze(1)  # possibly none
            expert_TO = lora_B(lora_A(self.dropout(x_TH.index_select(0, rows)))) * self.scaling
            weight_T1 = routing.probs_TE.index_select(0, rows)[:, expert, None]
            update_TO = update_TO.index_add(0, rows, expert_TO * weight_T1.to(expert_TO.dtype))
        return output + update_TO.view(output.shape).to(output.dtype)

    def merge(self) -> None:
        raise OptionError(
            "merge (Mo-LoRA) is impossible: each token's update depends on its own routing, so "
            "no single weight holds it; keep the adapters beside the base (save_mo_lora)"
        )


def apply_mo_lora(model: nn.Module, config: MoLoRAConfig) -> nn.Module:
    """Wrap every ``nn.Linear`` whose name ends in one of ``config.target_modules`` (in place);
    freeze everything else. Returns the model, with ``model.mo_lora_config`` set."""
    if getattr(model, "mo_lora_config", None) is not None:
        raise OptionError("model already has Mo-LoRA adapters; apply_mo_lora once per model")
    targets = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in config.target_modules
    ]
    found = {name.rsplit(".", 1)[-1] for name, _ in targets}
    missing = [t for t in config.target_modules if t not in found]
    if missing:
        linears = sorted(
            {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)}
        )
        raise OptionError(
            f"target_modules ({missing!r}) must name linears of the model; "
            f"{type(model).__name__} has {linears}"
        )
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, MoLoRALinear(module, config).train(module.training))
    model.mo_lora_config = config
    return model


def mo_lora_modules(model: nn.Module) -> dict[str, MoLoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, MoLoRALinear)}
