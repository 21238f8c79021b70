"""The measured Load of a model while it evaluates: true experts per token, per layer.

- AdaMoE MoE blocks: each forward's router logits routed again by the block's own ``route``
  (the same rule it computed with): true picks / tokens.
- Mo-LoRA linears: the rows each LoRA expert computed / tokens, averaged over a decoder layer's
  wrapped linears (true LoRA experts per token and linear).
- Blocks routed by Ada-K allocators (``model.adak``, adamoe-eval ``--adapter``): the true
  experts each token used under its chosen k.
- Any other MoE (transformers' Mixtral, ...): k, its fixed ``num_experts_per_tok``.
Every token a forward sees is counted (evaluate with batch size 1: no padding)."""

from __future__ import annotations

import re
from typing import Optional

import torch

_LAYER = re.compile(r"layers\.(\d+)\.")


class LoadMeter:
    """``with LoadMeter(model) as meter: ...evaluate...; meter.loads()`` -> [load per layer]."""

    def __init__(self, model: torch.nn.Module) -> None:
        from megatron_adamoe.adapters.mo_lora import MoLoRALinear
        from megatron_adamoe.hf.modeling_adamoe import AdaMoESparseMoeBlock

        self.kind, self.handles = "fixed", []
        self.counts: dict[int, list[float]] = {}  # layer -> [true picks, tokens]
        self.module_counts: dict = {}  # Mo-LoRA linear -> [true picks, tokens]
        adak = getattr(model, "adak", None)
        routed = {id(b): i for i, b in enumerate(adak._blocks)} if adak is not None else {}
        for name, module in model.named_modules():
            match = _LAYER.search(name + ".")
            layer = int(match.group(1)) if match else 0
            if id(module) in routed:
                self.kind = "ada-k"
                hook = self._adak_hook(layer, adak, routed[id(module)])
                self.handles.append(module.register_forward_hook(hook))
            elif isinstance(module, AdaMoESparseMoeBlock):
                self.kind = "adamoe"
                self.handles.append(module.register_forward_hook(self._moe_hook(layer)))
            elif isinstance(module, MoLoRALinear):
                self.kind = "mo-lora"
                self.handles.append(module.register_forward_hook(self._lora_hook(layer)))
        config = getattr(model, "config", None)
        self.fixed_k: Optional[int] = getattr(config, "num_experts_per_tok", None)
        self.num_layers = getattr(config, "num_hidden_layers", 0)

    def _add(self, layer: int, picks: float, tokens: float) -> None:
        total = self.counts.setdefault(layer, [0.0, 0.0])
        total[0] += picks
        total[1] += tokens

    def _moe_hook(self, layer: int):
        def hook(block, inputs, output):
            logits_TX = output[1].detach()
            with torch.no_grad():
                picks = float(block.route(logits_TX).routing_map_TE.sum())
            self._add(layer, picks, float(logits_TX.size(0)))

        return hook

    def _adak_hook(self, layer: int, adak, index: int):
        def hook(block, inputs, output):
            true_T = adak.steps[index].true_experts_T
            self._add(layer, float(true_T.sum()), float(true_T.numel()))

        return hook

    def _lora_hook(self, layer: int):
        def hook(module, inputs, output):
            tokens = float(module.last_router_logits.size(0))
            picks = float(module.last_expert_rows_E.sum())
            self._add(layer, picks, tokens)
            total = self.module_counts.setdefault(module, [0.0, 0.0])
            total[0] += picks
            total[1] += tokens

        return hook

    def reset(self) -> None:
        self.counts, self.module_counts = {}, {}

    def module_loads(self) -> dict:
        """Mo-LoRA: {wrapped linear: true LoRA experts per token} (its FLOPs are per linear)."""
        return {m: p / t if t else 0.0 for m, (p, t) in self.module_counts.items()}

    def loads(self) -> list[float]:
        """The load of each counted layer (in layer order); a fixed-k MoE: k per layer; a dense
        model: []."""
        if self.kind == "fixed":
            return [float(self.fixed_k)] * self.num_layers if self.fixed_k else []
        return [p / t if t else 0.0 for _, (p, t) in sorted(self.counts.items())]

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def __enter__(self) -> "LoadMeter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
