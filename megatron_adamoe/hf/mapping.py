"""Tensor names and layouts: Megatron-Core GPT (AdaMoE) <-> the Hugging Face AdaMoE model.

Pure torch. Three namings of the same weights:

- *dist*: keys of a Megatron dist checkpoint. Layers are stacked on a leading axis (and experts
  on the next one), norms carry Transformer Engine's fused names whatever the spec
  (``decoder.layers.self_attention.linear_qkv.layer_norm_weight``).
- *local*: a Megatron GPTModel's own ``state_dict()`` at TP = EP = PP = 1 with the local spec
  (``decoder.layers.3.mlp.experts.local_experts.5.linear_fc1.weight``).
- *hf*: ``AdaMoEForCausalLM`` (Mixtral's names: ``model.layers.3.block_sparse_moe.experts.5.w1``).

Local <-> HF is one declarative table (``TABLE``): each entry names a local template and its HF
template(s), ``{i}`` the layer and ``{e}`` the expert, and the entries that are not a rename carry
their split/merge: Megatron's ``linear_qkv`` interleaves [q heads of group g; k_g; v_g] per query
group, ``linear_fc1`` is [gate; up] for SwiGLU (HF ``w1``, ``w3``). Both directions and the HF
name set are read off the table. The router has n + m rows either way; its selection biases
(aux-loss-free ``expert_bias`` [n], the load controller's ``null_bias`` [1]) map 1:1 when the
model has them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from megatron_adamoe.errors import OptionError
from megatron_adamoe.options.vocab import ROUTER_DTYPE_FROM_HF, ROUTER_DTYPE_TO_HF  # noqa: F401

# (re-exported: export and import read them from here)


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
    expert_bias: bool = False  # routers carry an aux-loss-free expert bias
    null_bias: bool = False  # routers carry the load controller's null bias


@dataclass(frozen=True)
class Entry:
    """``local`` <-> ``hf`` (one name, or several with ``split``/``merge``). ``scope``: "model"
    (once), "layer" (every layer), "dense" / "moe" (layers of that kind), "expert" (every expert
    of an MoE layer). ``when``: a ModelShape flag that must be set for the entry to exist."""

    scope: str
    local: str
    hf: tuple
    split: Optional[Callable] = None  # (local tensor, shape) -> tuple of hf tensors
    merge: Optional[Callable] = None  # (hf tensors, shape) -> local tensor
    when: Optional[str] = None


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


def _split_fc1(fc1: torch.Tensor, shape: ModelShape):
    return tuple(fc1.chunk(2, dim=0))  # [gate; up] -> w1, w3


def _merge_fc1(w1: torch.Tensor, w3: torch.Tensor, shape: ModelShape):
    return torch.cat([w1, w3])


_L, _H = "decoder.layers.{i}.", "model.layers.{i}."
_EXPERT = _L + "mlp.experts.local_experts.{e}."
_HF_EXPERT = _H + "block_sparse_moe.experts.{e}."
TABLE = (
    Entry("model", "embedding.word_embeddings.weight", ("model.embed_tokens.weight",)),
    Entry("model", "decoder.final_layernorm.weight", ("model.norm.weight",)),
    Entry("model", "output_layer.weight", ("lm_head.weight",), when="untied_embeddings"),
    Entry("layer", _L + "input_layernorm.weight", (_H + "input_layernorm.weight",)),
    Entry("layer", _L + "pre_mlp_layernorm.weight", (_H + "post_attention_layernorm.weight",)),
    Entry("layer", _L + "self_attention.linear_proj.weight", (_H + "self_attn.o_proj.weight",)),
    Entry(
        "layer",
        _L + "self_attention.linear_qkv.weight",
        tuple(_H + f"self_attn.{p}_proj.weight" for p in "qkv"),
        split_qkv,
        merge_qkv,
    ),
    Entry(
        "dense",
        _L + "mlp.linear_fc1.weight",
        (_H + "mlp.w1.weight", _H + "mlp.w3.weight"),
        _split_fc1,
        _merge_fc1,
    ),
    Entry("dense", _L + "mlp.linear_fc2.weight", (_H + "mlp.w2.weight",)),
    Entry("moe", _L + "mlp.router.weight", (_H + "block_sparse_moe.gate.weight",)),
    Entry(
        "moe",
        _L + "mlp.router.expert_bias",
        (_H + "block_sparse_moe.expert_bias",),
        when="expert_bias",
    ),
    Entry(
        "moe", _L + "mlp.router.null_bias", (_H + "block_sparse_moe.null_bias",), when="null_bias"
    ),
    Entry(
        "expert",
        _EXPERT + "linear_fc1.weight",
        (_HF_EXPERT + "w1.weight", _HF_EXPERT + "w3.weight"),
        _split_fc1,
        _merge_fc1,
    ),
    Entry("expert", _EXPERT + "linear_fc2.weight", (_HF_EXPERT + "w2.weight",)),
)


def _instances(shape: ModelShape):
    """(entry, filled local name, filled hf names) for every tensor of this shape."""
    flags = {
        "untied_embeddings": not shape.tied_embeddings,
        "expert_bias": shape.expert_bias,
        "null_bias": shape.null_bias,
    }
    for entry in TABLE:
        if entry.when and not flags[entry.when]:
            continue
        if entry.scope == "model":
            places = [{}]
        else:
            layers = {
                "layer": range(shape.num_layers),
                "dense": [i for i in range(shape.num_layers) if i not in shape.moe_layers],
                "moe": shape.moe_layers,
                "expert": shape.moe_layers,
            }[entry.scope]
            places = [{"i": i} for i in layers]
            if entry.scope == "expert":
                places = [{"i": p["i"], "e": e} for p in places for e in range(shape.num_experts)]
        for place in places:
            yield entry, entry.local.format(**place), tuple(h.format(**place) for h in entry.hf)


def local_to_hf(local: dict, shape: ModelShape) -> dict:
    hf = {}
    for entry, local_name, hf_names_ in _instances(shape):
        tensor = local[local_name]
        values = entry.split(tensor, shape) if entry.split else (tensor,)
        hf.update(zip(hf_names_, values))
    return hf


def hf_to_local(hf: dict, shape: ModelShape) -> dict:
    local = {}
    for entry, local_name, hf_names_ in _instances(shape):
        values = [hf[name] for name in hf_names_]
        local[local_name] = entry.merge(*values, shape) if entry.merge else values[0]
    return local


def hf_names(shape: ModelShape) -> set:
    """Every tensor name of the HF model of this shape."""
    return {name for _, _, names in _instances(shape) for name in names}


# --- dist checkpoint keys -> local names -------------------------------------------------------
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
    "mlp.router.expert_bias": "mlp.router.expert_bias",
    "mlp.router.null_bias": "mlp.router.null_bias",
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
    return parsed is not None and (
        parsed[1] in _DIST_LAYER_PARTS or parsed[1] in _DIST_EXPERT_PARTS
    )


def dist_to_local(tensors: dict, shape: ModelShape) -> dict:
    """Dist-checkpoint tensors -> per-layer local names (unknown keys raise)."""
    unknown = sorted(key for key in tensors if not is_dist_model_key(key))
    if unknown:
        raise OptionError(
            f"checkpoint tensors ({', '.join(unknown)}) must be model tensors this "
            "converter knows; the checkpoint has modules it does not support"
        )
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
