"""Tensor names and layouts: Megatron-Core GPT (AdaMoE) <-> the Hugging Face AdaMoE model.

Pure torch. Three namings of the same weights:

- *dist*: keys of a Megatron dist checkpoint. Layers are stacked on a leading axis (and experts
  on the next one), norms carry Transformer Engine's fused names whatever the spec
  (``decoder.layers.self_attention.linear_qkv.layer_norm_weight``).
- *local*: a Megatron GPTModel's own ``state_dict()`` at TP = EP = PP = 1 with the local spec
  (``decoder.layers.3.mlp.experts.local_experts.5.linear_fc1.weight``).
- *hf*: ``AdaMoEForCausalLM`` (Mixtral's names: ``model.layers.3.block_sparse_moe.experts.5.w1``).

Layouts that are not a rename: Megatron's ``linear_qkv`` interleaves [q heads of group g; k_g;
v_g] per query group; ``linear_fc1`` is [gate; up] for SwiGLU (HF ``w1``, ``w3``); the router
has n + m rows either way.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from megatron_adamoe.errors import OptionError


# Megatron's moe_router_dtype -> the HF config's router_dtype, and back.
ROUTER_DTYPE_TO_HF = {None: None, "fp32": "float32", "fp64": "float64"}
ROUTER_DTYPE_FROM_HF = {hf: megatron for megatron, hf in ROUTER_DTYPE_TO_HF.items()}


@dataclass(frozen=True)
class ModelShape:
    num_layers: int
    moe_layers: tuple
    hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    head_dim: int
    num_experts: int
    tied_embeddings: bool


# (local name, hf name) per layer, 1:1.
_LAYER_RENAMES = (
    ("input_layernorm.weight", "input_layernorm.weight"),
    ("pre_mlp_layernorm.weight", "post_attention_layernorm.weight"),
    ("self_attention.linear_proj.weight", "self_attn.o_proj.weight"),
)
_MOE_RENAMES = (("mlp.router.weight", "block_sparse_moe.gate.weight"),)
# Per-layer part of a dist key -> local per-layer name. A homogeneous stack stores each under
# ``decoder.layers.<part>`` with the layers on axis 0; a mixed dense/MoE stack stores
# ``decoder.layers.<i>.<part>`` per layer.
_DIST_LAYER_PARTS = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "input_layernorm.weight": "input_layernorm.weight",
    "self_attention.linear_qkv.weight": "self_attention.linear_qkv.weight",
    "self_attention.linear_proj.weight": "self_attention.linear_proj.weight",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
    "pre_mlp_layernorm.weight": "pre_mlp_layernorm.weight",
    "mlp.router.weight": "mlp.router.weight",
    "mlp.linear_fc1.weight": "mlp.linear_fc1.weight",
    "mlp.linear_fc2.weight": "mlp.linear_fc2.weight",
}
# Per-layer part -> local per-expert name (experts on the next axis). SequentialMLP and
# TEGroupedMLP name them differently; the layout is the same.
_DIST_EXPERT_PARTS = {
    "mlp.experts.experts.linear_fc1.weight": "linear_fc1.weight",
    "mlp.experts.experts.linear_fc2.weight": "linear_fc2.weight",
    "mlp.experts.linear_fc1.weight": "linear_fc1.weight",
    "mlp.experts.linear_fc2.weight": "linear_fc2.weight",
}
_DIST_GLOBAL_KEYS = (
    "embedding.word_embeddings.weight",
    "decoder.final_layernorm.weight",
    "output_layer.weight",
)
_PER_LAYER_KEY = re.compile(r"decoder\.layers\.(\d+)\.(.+)")
_STACKED_KEY = re.compile(r"decoder\.layers\.(.+)")


def _parse_dist_key(key: str):
    """-> (layer index or None for a stacked tensor, per-layer part), or None if not a layer."""
    match = _PER_LAYER_KEY.fullmatch(key)
    if match:
        return int(match.group(1)), match.group(2)
    match = _STACKED_KEY.fullmatch(key)
    return (None, match.group(1)) if match else None


def is_dist_model_key(key: str) -> bool:
    """A model tensor of a dist checkpoint (not optimizer state, RNG or extra state)."""
    if key in _DIST_GLOBAL_KEYS:
        return True
    parsed = _parse_dist_key(key)
    return parsed is not None and (parsed[1] in _DIST_LAYER_PARTS
                                   or parsed[1] in _DIST_EXPERT_PARTS)


def dist_to_local(tensors: dict, shape: ModelShape) -> dict:
    """Dist-checkpoint tensors -> per-layer local names (unknown keys raise)."""
    unknown = sorted(key for key in tensors if not is_dist_model_key(key))
    if unknown:
        raise OptionError(f"checkpoint tensors ({', '.join(unknown)}) must be model tensors this "
                         "converter knows; the checkpoint has modules it does not support")
    local = {}
    for key, tensor in tensors.items():
        if key in _DIST_GLOBAL_KEYS:
            local[key] = tensor
            continue
        layer, part = _parse_dist_key(key)
        per_layer = enumerate(tensor) if layer is None else [(layer, tensor)]
        for index, layer_tensor in per_layer:
            prefix = f"decoder.layers.{index}."
            if part in _DIST_EXPERT_PARTS:
                for expert in range(shape.num_experts):
                    name = f"{prefix}mlp.experts.local_experts.{expert}."
                    local[name + _DIST_EXPERT_PARTS[part]] = layer_tensor[expert]
            else:
                local[prefix + _DIST_LAYER_PARTS[part]] = layer_tensor
    return local


def local_to_hf(local: dict, shape: ModelShape) -> dict:
    hf = {
        "model.embed_tokens.weight": local["embedding.word_embeddings.weight"],
        "model.norm.weight": local["decoder.final_layernorm.weight"],
    }
    if not shape.tied_embeddings:
        hf["lm_head.weight"] = local["output_layer.weight"]
    for layer in range(shape.num_layers):
        src, dst = f"decoder.layers.{layer}.", f"model.layers.{layer}."
        for local_name, hf_name in _LAYER_RENAMES:
            hf[dst + hf_name] = local[src + local_name]
        q, k, v = split_qkv(local[src + "self_attention.linear_qkv.weight"], shape)
        hf[dst + "self_attn.q_proj.weight"] = q
        hf[dst + "self_attn.k_proj.weight"] = k
        hf[dst + "self_attn.v_proj.weight"] = v
        if layer in shape.moe_layers:
            for local_name, hf_name in _MOE_RENAMES:
                hf[dst + hf_name] = local[src + local_name]
            for expert in range(shape.num_experts):
                _fc_to_hf(local, f"{src}mlp.experts.local_experts.{expert}.",
                          hf, f"{dst}block_sparse_moe.experts.{expert}.")
        else:
            _fc_to_hf(local, src + "mlp.", hf, dst + "mlp.")
    return hf


def hf_to_local(hf: dict, shape: ModelShape) -> dict:
    local = {
        "embedding.word_embeddings.weight": hf["model.embed_tokens.weight"],
        "decoder.final_layernorm.weight": hf["model.norm.weight"],
    }
    if not shape.tied_embeddings:
        local["output_layer.weight"] = hf["lm_head.weight"]
    for layer in range(shape.num_layers):
        src, dst = f"model.layers.{layer}.", f"decoder.layers.{layer}."
        for local_name, hf_name in _LAYER_RENAMES:
            local[dst + local_name] = hf[src + hf_name]
        local[dst + "self_attention.linear_qkv.weight"] = merge_qkv(
            hf[src + "self_attn.q_proj.weight"], hf[src + "self_attn.k_proj.weight"],
            hf[src + "self_attn.v_proj.weight"], shape)
        if layer in shape.moe_layers:
            for local_name, hf_name in _MOE_RENAMES:
                local[dst + local_name] = hf[src + hf_name]
            for expert in range(shape.num_experts):
                _fc_to_local(hf, f"{src}block_sparse_moe.experts.{expert}.",
                             local, f"{dst}mlp.experts.local_experts.{expert}.")
        else:
            _fc_to_local(hf, src + "mlp.", local, dst + "mlp.")
    return local


def hf_names(shape: ModelShape) -> set:
    """Every tensor name of the HF model of this shape."""
    names = {"model.embed_tokens.weight", "model.norm.weight"}
    if not shape.tied_embeddings:
        names.add("lm_head.weight")
    for layer in range(shape.num_layers):
        prefix = f"model.layers.{layer}."
        names.update(prefix + hf_name for _, hf_name in _LAYER_RENAMES)
        names.update(f"{prefix}self_attn.{p}_proj.weight" for p in "qkv")
        if layer in shape.moe_layers:
            names.update(prefix + hf_name for _, hf_name in _MOE_RENAMES)
            ffns = [f"{prefix}block_sparse_moe.experts.{e}." for e in range(shape.num_experts)]
        else:
            ffns = [prefix + "mlp."]
        names.update(f"{ffn}{w}.weight" for ffn in ffns for w in ("w1", "w2", "w3"))
    return names


def _fc_to_hf(local: dict, src: str, hf: dict, dst: str) -> None:
    gate, up = local[src + "linear_fc1.weight"].chunk(2, dim=0)
    hf[dst + "w1.weight"], hf[dst + "w3.weight"] = gate, up
    hf[dst + "w2.weight"] = local[src + "linear_fc2.weight"]


def _fc_to_local(hf: dict, src: str, local: dict, dst: str) -> None:
    local[dst + "linear_fc1.weight"] = torch.cat([hf[src + "w1.weight"], hf[src + "w3.weight"]])
    local[dst + "linear_fc2.weight"] = hf[src + "w2.weight"]


def split_qkv(qkv: torch.Tensor, shape: ModelShape):
    """Megatron's per-group [q_g; k_g; v_g] rows -> (q, k, v) with heads in order."""
    groups, head_dim = shape.num_query_groups, shape.head_dim
    q_per_group = shape.num_attention_heads // groups
    grouped = qkv.view(groups, q_per_group + 2, head_dim, qkv.size(-1))
    q = grouped[:, :q_per_group].reshape(-1, qkv.size(-1))
    k = grouped[:, q_per_group].reshape(-1, qkv.size(-1))
    v = grouped[:, q_per_group + 1].reshape(-1, qkv.size(-1))
    return q.clone(), k.clone(), v.clone()


def merge_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, shape: ModelShape):
    groups, head_dim = shape.num_query_groups, shape.head_dim
    hidden = q.size(-1)
    q_grouped = q.view(groups, -1, head_dim, hidden)
    k_grouped, v_grouped = k.view(groups, 1, head_dim, hidden), v.view(groups, 1, head_dim, hidden)
    return torch.cat([q_grouped, k_grouped, v_grouped], dim=1).reshape(-1, hidden)
