"""Ada-K on a Hugging Face MoE model: one allocator per MoE block picks each token's k, and the
block's frozen router takes its top-k over its own ranking, weights renormalised as that router
does. The model itself is not changed (same modules, same state dict): each block's forward is
overridden on the instance while the allocators are attached.

Blocks: this project's ``AdaMoESparseMoeBlock`` (the HF AdaMoE model, m = 0 a plain top-k MoE;
with null experts k counts picks over n + m, and the block's weight norm, selection bias and
identity nulls apply as in its own routing) and transformers' ``MixtralSparseMoeBlock``
(softmax over the n experts, the k best, renormalised over them).

Shape legend: B batch, S sequence, T = B x S tokens, H hidden, X experts the router scores,
C choices of k (1..C).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from megatron_adamoe.adak.allocator import KAllocator, choose_k, log_prob
from megatron_adamoe.errors import OptionError
from megatron_adamoe.ops.routing import null_expert_topk_routing, topk_slots_from_routing_map

MODES = ("argmax", "sample", "replay", "topk")  # "topk": the model's own routing (the baseline)
ALLOCATORS_FILE = "adak_allocators.safetensors"
CONFIG_FILE = "adak_config.json"


@dataclass(frozen=True)
class BlockStep:
    """What one block saw and chose in the last forward: the allocator's input (the state), the
    chosen k, its log-probability under the acting allocator, and the true experts used."""

    state_TH: torch.Tensor
    k_T: torch.Tensor
    log_prob_T: torch.Tensor
    true_experts_T: torch.Tensor


def moe_blocks(model: nn.Module) -> list[nn.Module]:
    """The model's MoE blocks that Ada-K can route, in layer order."""
    return [m for m in model.modules() if _is_adamoe_block(m) or _is_mixtral_block(m)]


def _is_adamoe_block(module: nn.Module) -> bool:
    """The HF AdaMoE block, also as loaded from a model directory's own modeling file."""
    return type(module).__name__ == "AdaMoESparseMoeBlock"


def _is_mixtral_block(module: nn.Module) -> bool:
    try:
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    except ImportError:  # pragma: no cover - a transformers without Mixtral
        return False
    return isinstance(module, MixtralSparseMoeBlock)


def choices(block: nn.Module) -> int:
    """C: the most picks a token may take (the paper: every expert the router scores)."""
    if _is_adamoe_block(block):
        return block.num_true_experts + block.num_null_experts
    return block.experts.num_experts


def default_k(block: nn.Module) -> int:
    return block.topk if _is_adamoe_block(block) else block.gate.top_k


class AdaK(nn.Module):
    """The allocators of one model (``allocators[l]`` for its l-th MoE block) and the routing
    they drive. ``mode``: "argmax" (inference), "sample" (acting in training), "replay" (the
    k of ``replay_k`` per block), "topk" (the model's own routing: the PPO baseline)."""

    def __init__(self, model: nn.Module, max_k: Optional[int] = None) -> None:
        super().__init__()
        blocks = moe_blocks(model)
        if not blocks:
            raise OptionError(
                f"model ({type(model).__name__}) must have MoE blocks Ada-K can route "
                "(AdaMoE or Mixtral); pass an MoE model"
            )
        limit = min(choices(b) for b in blocks)
        if max_k is not None and not 1 <= max_k <= limit:
            raise OptionError(
                f"max_k ({max_k}) must be in 1..{limit} (the experts a router scores); fix "
                "--adak-max-k"
            )
        hidden = model.config.hidden_size
        self.max_k = max_k or limit
        self.allocators = nn.ModuleList(KAllocator(hidden, self.max_k) for _ in blocks)
        self.default_k = [default_k(b) for b in blocks]
        self._blocks = blocks  # not submodules: the model owns them
        self.mode = "argmax"
        self.generator: Optional[torch.Generator] = None
        self.replay_k: Optional[list[torch.Tensor]] = None
        self.uniform: Optional[list[torch.Tensor]] = None  # per layer [T]: "sample" draws
        self.steps: list[Optional[BlockStep]] = [None] * len(blocks)
        for layer, block in enumerate(blocks):
            block.forward = _routed_forward(self, layer, block)

    def detach(self) -> None:
        """The blocks' own forward again."""
        for block in self._blocks:
            del block.forward

    def set_mode(self, mode: str) -> None:
        if mode not in MODES:
            raise OptionError(f"Ada-K mode ({mode!r}) must be one of {', '.join(MODES)}")
        self.mode = mode

    def save(self, directory: str) -> None:
        """The allocators and their config, next to (never inside) the unchanged model."""
        from safetensors.torch import save_file

        os.makedirs(directory, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.allocators.state_dict().items()}
        save_file(state, os.path.join(directory, ALLOCATORS_FILE + ".tmp"))
        os.replace(
            os.path.join(directory, ALLOCATORS_FILE + ".tmp"),
            os.path.join(directory, ALLOCATORS_FILE),
        )
        config = {"max_k": self.max_k, "num_layers": len(self.allocators)}
        with open(os.path.join(directory, CONFIG_FILE), "w") as handle:
            json.dump(config, handle, indent=1)

    @classmethod
    def load(cls, model: nn.Module, directory: str) -> "AdaK":
        from safetensors.torch import load_file

        with open(os.path.join(directory, CONFIG_FILE)) as handle:
            config = json.load(handle)
        layers = len(moe_blocks(model))
        if layers != config["num_layers"]:
            raise OptionError(
                f"allocators in {directory} ({config['num_layers']} layers) must match the "
                f"model's {layers} MoE layers; pass the model they were trained on"
            )
        adak = cls(model, config["max_k"])
        adak.allocators.load_state_dict(load_file(os.path.join(directory, ALLOCATORS_FILE)))
        return adak.to(next(model.parameters()).device)


def _routed_forward(adak: AdaK, layer: int, block: nn.Module):
    original = type(block).forward
    is_adamoe = _is_adamoe_block(block)

    def forward(x_BSH: torch.Tensor, *args, **kwargs):
        if adak.mode == "topk":
            adak.steps[layer] = None
            return original(block, x_BSH, *args, **kwargs)
        x_TH = x_BSH.reshape(-1, x_BSH.size(-1))
        logits_TC = adak.allocators[layer](x_TH)
        if adak.mode == "replay":
            k_T = adak.replay_k[layer]
        else:
            uniform_T = adak.uniform[layer] if adak.uniform is not None else None
            k_T = choose_k(logits_TC, adak.mode == "sample", adak.generator, uniform_T)
        if is_adamoe:
            out = original(block, x_BSH, k_T=k_T)
            true_T = _last_true_experts(block, x_TH, k_T)
        else:
            out, true_T = _mixtral_forward(block, x_TH, k_T)
            out = out.view_as(x_BSH)
        adak.steps[layer] = BlockStep(x_TH.detach(), k_T, log_prob(logits_TC, k_T).detach(), true_T)
        return out

    return forward


@torch.no_grad()
def _last_true_experts(block, x_TH: torch.Tensor, k_T: torch.Tensor) -> torch.Tensor:
    """[T] true experts each token used (k_T less its null picks)."""
    if not block.num_null_experts:
        return k_T
    return block.route(block.router_logits(x_TH), k_T).routing_map_TE.sum(dim=-1)


def _mixtral_forward(block, x_TH: torch.Tensor, k_T: torch.Tensor):
    """MixtralSparseMoeBlock with each token's k: softmax over the router logits, the k best,
    renormalised over them (the block's own rule), then its experts."""
    logits_TX = F.linear(x_TH, block.gate.weight)
    num_experts = logits_TX.size(-1)
    routing = null_expert_topk_routing(
        logits_TX, int(k_T.max()), num_experts, "all_selected", k_T=k_T, cast_after_scaling=True
    )
    weights_TK, indices_TK = topk_slots_from_routing_map(
        routing.probs_TE, routing.routing_map_TE, int(k_T.max())
    )
    # A token with fewer than max k picks fills its empty slots with its first pick at weight 0:
    # transformers' grouped_mm and batched_mm experts skip the "no expert" index (num_experts)
    # only under expert parallelism, and otherwise leave its rows uninitialised (NaN * 0 = NaN).
    empty_TK = indices_TK < 0
    indices_TK = torch.where(empty_TK, indices_TK[:, :1], indices_TK)
    weights_TK = weights_TK.masked_fill(empty_TK, 0.0)
    return block.experts(x_TH, indices_TK, weights_TK), k_T
