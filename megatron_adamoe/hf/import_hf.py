"""Hugging Face Mixtral (or an exported AdaMoE model) -> AdaMoE Megatron dist checkpoint.

A Mixtral router has n rows; AdaMoE's has n + m. The m null rows come from the original gate
(``null_router_init``):

- ``tile`` (the AdaMoE authors' choice): null row j copies true row j mod n. Every null expert
  then ties with a true expert, so at the start the router spreads its k picks over true and
  null experts alike and the load starts near k*n/(n+m) (exactly k/2 when m = n and k is even;
  for odd k the last pick's tie decides).
- ``random``: null rows drawn from N(0, std of the gate), seeded per layer (``seed`` + layer).
  Null logits are then unrelated to the true ones, so the initial load depends on the model;
  use it to start the null experts from scratch.

The output is a weights-only checkpoint (``OUT/iter_0000000`` and its tracker) whose
``config.yaml`` carries the model, ``--tp/--ep/--pp`` and ``finetune: true``: fine-tune it with
``torchrun ... -m megatron_adamoe.training.pretrain --config OUT/iter_0000000/config.yaml
--data-path ... [--tokenizer-model ...]``. Dist checkpoints store global tensors, so the
conversion itself runs in one process whatever the layout it is written for.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil

import torch
from safetensors import safe_open

from megatron_adamoe.errors import OptionError
from megatron_adamoe.hf.mapping import (
    ROUTER_DTYPE_FROM_HF,
    ModelShape,
    hf_names,
    hf_to_local,
)
from megatron_adamoe.hf.strict import listing, load_strictly
from megatron_adamoe.options import PretrainArguments, validate
from megatron_adamoe.storage import atomic_directory, check_writable

logger = logging.getLogger(__name__)

ARCHITECTURES = ("MixtralForCausalLM", "AdaMoEForCausalLM")
NULL_ROUTER_INITS = ("tile", "random")


def check_new_output(out: str, written: str) -> None:
    """``out`` is new and its parent takes ``written`` (written next to it, then renamed)."""
    if os.path.exists(out):
        raise OptionError(f"out ({out!r}) must not exist yet; remove it or pick another path")
    check_writable(
        "out",
        os.path.dirname(os.path.abspath(out)),
        f"{written} is written next to it first; pick a writable place",
    )


def check_output_and_null_init(out: str, null_router_init: str, written: str) -> None:
    """The checks the converters into AdaMoE make first: ``check_new_output`` and a known
    ``null_router_init``."""
    check_new_output(out, written)
    if null_router_init not in NULL_ROUTER_INITS:
        raise OptionError(
            f"null_router_init ({null_router_init!r}) must be one of "
            f"{NULL_ROUTER_INITS}; see megatron_adamoe/hf/import_hf.py"
        )


INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


REQUIRED_KEYS = (
    "hidden_size",
    "num_attention_heads",
    "num_hidden_layers",
    "intermediate_size",
    "num_local_experts",
    "num_experts_per_tok",
    "vocab_size",
)


def read_hf_config(hf_dir: str) -> dict:
    path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(path):
        raise OptionError(
            f"hf ({hf_dir!r}) must be a Hugging Face model directory with "
            "config.json; check the path"
        )
    try:
        with open(path) as handle:
            config = json.load(handle)
    except (OSError, json.JSONDecodeError) as error:
        raise OptionError(f"{path} must be readable JSON; restore it ({error})") from None
    architectures = config.get("architectures") or []
    if len(architectures) != 1 or architectures[0] not in ARCHITECTURES:
        raise OptionError(
            f"architectures ({architectures!r}) must be one of {ARCHITECTURES}; "
            f"{path} describes a model this converter does not know"
        )
    missing = [key for key in REQUIRED_KEYS if not isinstance(config.get(key), int)]
    if missing:
        raise OptionError(
            f"config.json keys ({', '.join(missing)}) must be present as integers; "
            f"{path} is incomplete"
        )
    _reject_unsupported(config, path)
    return config


def _reject_unsupported(config: dict, path: str) -> None:
    """HF options that change the model's output and Megatron's GPT here does not reproduce."""
    rope = config.get("rope_parameters") or {}
    unsupported = {
        "rope_scaling": (config.get("rope_scaling"), None),
        "rope_type": (rope.get("rope_type", "default"), "default"),
        "sliding_window": (config.get("sliding_window"), None),
        "attention_bias": (config.get("attention_bias", False), False),
        "hidden_act": (config.get("hidden_act", "silu"), "silu"),
        "router_topk_scaling_factor": (config.get("router_topk_scaling_factor"), None),
    }
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    unsupported["head_dim"] = (config.get("head_dim") or hidden // heads, hidden // heads)
    for name, (value, supported) in unsupported.items():
        if value != supported:
            raise OptionError(
                f"{name} ({value!r}) must be {supported!r} to import; {path} "
                "describes a model Megatron's AdaMoE GPT does not reproduce"
            )
    if config["architectures"][0] == "AdaMoEForCausalLM":
        from megatron_adamoe.hf.configuration_adamoe import AdaMoEHFConfig

        AdaMoEHFConfig(**config)  # its own one-line checks (null type, weight norm, ...)


def read_hf_tensors(hf_dir: str) -> dict:
    """Every tensor of the safetensors checkpoint (sharded with an index, or one file)."""
    index_path = os.path.join(hf_dir, INDEX_FILE)
    if os.path.isfile(index_path):
        try:
            with open(index_path) as handle:
                files = sorted(set(json.load(handle)["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            raise OptionError(
                f"{index_path} must be a safetensors index with a weight_map; restore it"
            ) from None
    elif os.path.isfile(os.path.join(hf_dir, SINGLE_FILE)):
        files = [SINGLE_FILE]
    else:
        raise OptionError(
            f"hf ({hf_dir!r}) must contain {INDEX_FILE} or {SINGLE_FILE}; only "
            "safetensors checkpoints are read"
        )
    missing = [name for name in files if not os.path.isfile(os.path.join(hf_dir, name))]
    if missing:
        raise OptionError(
            f"hf ({hf_dir!r}) must contain every shard its index names; missing: "
            f"{', '.join(missing)}"
        )
    tensors = {}
    for name in files:
        try:
            with safe_open(os.path.join(hf_dir, name), framework="pt") as handle:
                for key in handle.keys():
                    tensors[key] = handle.get_tensor(key)
        except Exception as error:  # noqa: BLE001 - a corrupt shard is one user error
            raise OptionError(
                f"hf shard ({name!r}) must be a readable safetensors file; copy it "
                f"again ({type(error).__name__}: {error})"
            ) from None
    return tensors


def aux_loss_coef_from_mixtral(mixtral: dict) -> float:
    """Mixtral's ``router_aux_loss_coef`` on AdaMoE's scale. transformers' Mixtral computes one
    load-balancing loss over all layers' routing pooled, with assignment fractions over T tokens
    (summing to k); AdaMoE (and Megatron) sum a per-layer loss whose fractions are over k*T
    assignments. So Mixtral's loss is about k / L times AdaMoE's sum over L layers, and the same
    pressure needs c * k / L (at m = 0 exactly so for equal layers)."""
    coef = float(mixtral.get("router_aux_loss_coef", 0.001))
    return coef * mixtral["num_experts_per_tok"] / mixtral["num_hidden_layers"]


def pretrain_arguments(
    config: dict, num_null_experts: int, topk: int, tp: int, ep: int, pp: int
) -> PretrainArguments:
    """The pretraining options of the converted model, validated for the requested layout."""
    heads = config["num_attention_heads"]
    rope = config.get("rope_parameters") or {}
    is_adamoe = config["architectures"][0] == "AdaMoEForCausalLM"
    max_positions = config.get("max_position_embeddings", 4096)
    args = PretrainArguments(
        num_layers=config["num_hidden_layers"],
        hidden_size=config["hidden_size"],
        ffn_hidden_size=config["intermediate_size"],
        num_attention_heads=heads,
        num_query_groups=config.get("num_key_value_heads") or heads,
        seq_length=min(max_positions, 4096),
        max_position_embeddings=max_positions,
        rotary_base=int(config.get("rope_theta") or rope.get("rope_theta") or 10000),
        norm_epsilon=float(config.get("rms_norm_eps", 1e-5)),
        untie_embeddings_and_output_weights=not config.get("tie_word_embeddings", False),
        num_experts=config["num_local_experts"],
        moe_ffn_hidden_size=config.get("moe_intermediate_size", config["intermediate_size"]),
        moe_router_topk=topk,
        moe_layer_freq=_moe_layer_freq(config),
        adamoe_num_null_experts=num_null_experts,
        adamoe_null_expert_type=config.get("null_expert_type", "zero"),
        adamoe_weight_norm=config.get("router_weight_norm", "true_experts"),
        moe_router_enable_expert_bias=bool(config.get("router_expert_bias", False)),
        adamoe_target_load=config.get("router_target_load")
        if config.get("router_null_bias")
        else None,
        adamoe_router_mode=config.get("router_mode", "topk"),
        adamoe_topp_threshold=config.get("router_topp_threshold"),
        # The source's coefficient on Megatron's per-layer scale (AdaMoE's is already on it).
        moe_aux_loss_coeff=float(config.get("router_aux_loss_coef", 0.01))
        if is_adamoe
        else aux_loss_coef_from_mixtral(config),
        adamoe_aux_loss_coeff_schedule=None,
        moe_router_dtype=ROUTER_DTYPE_FROM_HF[config.get("router_dtype", "float32")]
        if is_adamoe
        else "fp32",
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        expert_model_parallel_size=ep,
        sequence_parallel=tp > 1,  # Megatron requires it with MoE and TP
        finetune=True,
        # global_batch_size stays unset: the fine-tuning run's data-parallel size decides
        world_size=math.lcm(tp * pp, ep * tp * pp),
    )
    validate(args, check_io=False)
    return args


def _moe_layer_freq(config: dict):
    layers = config["num_hidden_layers"]
    moe_layers = config.get("moe_layers")
    if moe_layers is None or sorted(moe_layers) == list(range(layers)):
        return 1
    return [int(i in moe_layers) for i in range(layers)]


def null_router_rows(gate_EH: torch.Tensor, num_null: int, how: str, seed: int) -> torch.Tensor:
    """[m, H] router rows for the null experts, derived from the true experts' gate."""
    if how == "tile":
        return gate_EH[torch.arange(num_null) % gate_EH.size(0)].clone()
    generator = torch.Generator().manual_seed(seed)
    rows = torch.randn(num_null, gate_EH.size(1), generator=generator, dtype=torch.float32)
    return (rows * gate_EH.float().std()).to(gate_EH.dtype)


def import_hf(
    hf_dir: str,
    out: str,
    num_null_experts=None,
    topk=None,
    tp: int = 1,
    ep: int = 1,
    pp: int = 1,
    null_router_init: str = "tile",
    seed: int = 0,
) -> str:
    """Write the AdaMoE Megatron checkpoint ``out`` from ``hf_dir``; returns ``out``."""
    check_output_and_null_init(out, null_router_init, "the checkpoint")
    config = read_hf_config(hf_dir)
    is_adamoe = config["architectures"][0] == "AdaMoEForCausalLM"
    saved_nulls = config.get("num_null_experts", 0)
    if num_null_experts is None:
        num_null_experts = saved_nulls if is_adamoe else 0
    if is_adamoe and num_null_experts != saved_nulls:
        raise OptionError(
            f"num_null_experts ({num_null_experts}) must equal the AdaMoE model's "
            f"m ({saved_nulls}); drop --num-null-experts"
        )
    if num_null_experts < 0:
        raise OptionError(
            f"num_null_experts ({num_null_experts}) must be >= 0; pass a "
            "non-negative --num-null-experts"
        )
    topk = config["num_experts_per_tok"] if topk is None else topk
    args = pretrain_arguments(config, num_null_experts, topk, tp, ep, pp)
    tensors = read_hf_tensors(hf_dir)
    if not is_adamoe and num_null_experts:
        tensors = _add_null_router_rows(tensors, num_null_experts, null_router_init, seed)
    vocab_size = args.padded_vocab_size(config["vocab_size"])
    tensors = _pad_vocabulary(tensors, vocab_size)
    shape = ModelShape(
        num_layers=args.num_layers,
        moe_layers=tuple(args.moe_layer_indices()),
        hidden_size=args.hidden_size,
        num_attention_heads=args.num_attention_heads,
        num_query_groups=args.num_query_groups,
        head_dim=args.hidden_size // args.num_attention_heads,
        num_experts=args.num_experts,
        tied_embeddings=not args.untie_embeddings_and_output_weights,
        expert_bias=bool(config.get("router_expert_bias", False)),
        null_bias=bool(config.get("router_null_bias", False)),
    )
    _check_hf_names(tensors, shape, hf_dir)
    local = hf_to_local(tensors, shape)

    with atomic_directory(out, "importing") as temporary:
        args.load = os.path.abspath(out)
        tokenizer = os.path.join(hf_dir, "tokenizer.model")
        if os.path.isfile(tokenizer):
            shutil.copyfile(tokenizer, os.path.join(temporary, "tokenizer.model"))
            args.tokenizer_model = os.path.join(args.load, "tokenizer.model")
        save_megatron(args, local, temporary, vocab_size)
    logger.info(
        "imported %s -> %s (m = %d null experts, top-%d)", hf_dir, out, num_null_experts, topk
    )
    return out


def _add_null_router_rows(tensors: dict, num_null: int, how: str, seed: int) -> dict:
    out = dict(tensors)
    gates = sorted(
        (name for name in tensors if name.endswith("block_sparse_moe.gate.weight")),
        key=lambda name: int(name.split(".")[2]),
    )
    for layer_seed, name in enumerate(gates, start=seed):  # random rows differ per layer
        gate = tensors[name]
        out[name] = torch.cat([gate, null_router_rows(gate, num_null, how, layer_seed)])
    return out


def _pad_vocabulary(tensors: dict, vocab_size: int) -> dict:
    """Zero rows up to Megatron's padded vocabulary (a multiple of 128 x TP), as Megatron pads
    it; ids past the tokenizer's never occur in data."""
    out = dict(tensors)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        if name in tensors and tensors[name].shape[0] < vocab_size:
            weight = tensors[name]
            padding = weight.new_zeros(vocab_size - weight.shape[0], weight.shape[1])
            out[name] = torch.cat([weight, padding])
    return out


def _check_hf_names(tensors: dict, shape: ModelShape, hf_dir: str) -> None:
    """Exactly the tensors the mapping reads (shapes are checked on the Megatron side)."""
    expected = hf_names(shape)
    problems = []
    if expected - set(tensors):
        problems.append(f"missing: {listing(expected - set(tensors))}")
    if set(tensors) - expected:
        problems.append(f"unexpected: {listing(set(tensors) - expected)}")
    if problems:
        raise OptionError(
            f"hf ({hf_dir!r}) must hold exactly the tensors of its config; " + "; ".join(problems)
        )


def save_megatron(args: PretrainArguments, local: dict, directory: str, vocab_size: int):
    from megatron_adamoe.hf.megatron_model import (
        build_single_process_model,
        single_process_megatron,
    )
    from megatron_adamoe.training.checkpointing import save_weights

    with single_process_megatron():
        model = build_single_process_model(args, vocab_size, meta=True)
        load_strictly(
            model,
            local,
            what="converted tensors",
            ignore=lambda name: name.endswith("_extra_state"),
        )
        save_weights(args, model, directory)
