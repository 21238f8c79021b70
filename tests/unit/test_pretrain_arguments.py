"""Pretraining options: YAML + command line, Megatron names, one-line errors (messages pinned)."""

from __future__ import annotations

import glob
import os

import pytest
import yaml

from megatron_adamoe.options import (
    load_arguments,
    parse_overrides,
    resolved_yaml,
)
from tests.indexed_data import write_indexed_dataset

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CPU_CONFIG = os.path.join(REPO, "configs", "cpu_adamoe_tiny.yaml")


@pytest.fixture
def data(tmp_path):
    """A real (small) indexed dataset and a stand-in tokenizer file where the options expect
    them: 1000 documents of 2100 tokens, enough for every split the shipped configs read."""
    write_indexed_dataset(str(tmp_path / "corpus_text"), [2100] * 1000)
    (tmp_path / "tok.model").write_bytes(b"")
    return {
        "data_path": [str(tmp_path / "corpus_text")],
        "tokenizer_model": str(tmp_path / "tok.model"),
    }


def test_overrides_use_megatron_flag_spelling():
    assert parse_overrides(
        [
            "--moe-router-topk",
            "3",
            "--bf16",
            "--no-swiglu",
            "--data-path",
            "a",
            "b",
            "--lr=3e-4",
            "--save",
            "null",
        ]
    ) == {
        "moe_router_topk": 3,
        "bf16": True,
        "swiglu": False,
        "data_path": ["a", "b"],
        "lr": "3e-4",
        "save": None,
    }  # YAML 1.1 keeps 3e-4 a string; loading makes it a float


def test_command_line_overrides_yaml(data):
    overrides = {**data, "moe_router_topk": 2, "train_iters": 70, "lr": "3e-4"}
    args = load_arguments(CPU_CONFIG, overrides, 2)
    assert args.lr == 3e-4
    assert (args.moe_router_topk, args.train_iters, args.expert_model_parallel_size) == (2, 70, 2)
    assert args.data_parallel_size == 2 and args.num_microbatches == 1


SHIPPED = [
    ("cpu_adamoe_tiny.yaml", 2),
    ("cpu_top2_tiny.yaml", 2),
    ("cpu_dense_tiny.yaml", 2),
    ("cpu_adamoe_target_load.yaml", 2),
    ("gpu_mixtral_8x7b_adamoe.yaml", 64),
    ("gpu_1b_adamoe.yaml", 8),
]


@pytest.mark.parametrize("path, world_size", SHIPPED)
def test_every_shipped_config_validates_for_its_world_size(path, world_size, data):
    args = load_arguments(os.path.join(REPO, "configs", path), data, world_size)
    assert args.world_size == world_size
    from megatron_adamoe.training.model import transformer_config

    # AdaMoEConfig's own checks pass too; upstream refuses the fused kernels without Transformer
    # Engine, so on CPU the GPU recipes are checked with them off.
    args.moe_permute_fusion = args.moe_grouped_gemm = False
    config = transformer_config(args, on_gpu=False)
    assert config.num_moe_experts == (args.num_experts or None)  # 0: Megatron's dense model


def test_no_config_is_left_out_of_the_validation_test():
    shipped = {os.path.basename(p) for p in glob.glob(os.path.join(REPO, "configs", "*.yaml"))}
    assert shipped == {name for name, _ in SHIPPED}


def test_mixtral_recipe_is_the_papers_setting(data):
    args = load_arguments(os.path.join(REPO, "configs", "gpu_mixtral_8x7b_adamoe.yaml"), data, 64)
    assert (args.num_experts, args.adamoe_num_null_experts, args.moe_router_topk) == (8, 8, 3)
    assert (args.hidden_size, args.moe_ffn_hidden_size, args.num_layers) == (4096, 14336, 32)
    assert args.data_parallel_size == 16 and args.num_microbatches == 64


def test_resolved_config_reloads_to_the_same_options(tmp_path, data):
    args = load_arguments(CPU_CONFIG, data, 2)
    path = tmp_path / "resolved.yaml"
    path.write_text(resolved_yaml(args))
    again = load_arguments(str(path), None, 2)
    assert again.to_dict() == args.to_dict()
    # moe_aux_loss_coeff is resolved: 0 under a coefficient schedule
    assert yaml.safe_load(path.read_text())["moe_aux_loss_coeff"] == 0.0


def _error(config, overrides, world_size=2):
    with pytest.raises(ValueError) as info:
        load_arguments(config, overrides, world_size)
    return str(info.value)


def test_unknown_yaml_key_names_the_closest_valid_one(tmp_path, data):
    config = tmp_path / "typo.yaml"
    config.write_text("num_expert: 4\n")
    assert _error(str(config), data) == (
        "config key 'num_expert' (typo.yaml) is not a known option; did you mean 'num_experts'?"
    )


def test_unknown_key_without_a_close_match(data):
    assert _error(CPU_CONFIG, {**data, "zzz": 1}) == (
        "config key 'zzz' (command line) is not a known option; "
        "the keys are PretrainArguments fields"
    )


def test_wrong_type(data):
    assert _error(CPU_CONFIG, {**data, "num_layers": "four"}) == (
        "num_layers ('four') must be int (command line); fix the value"
    )


def test_topology_that_does_not_divide_the_world(data):
    assert _error(CPU_CONFIG, {**data, "tensor_model_parallel_size": 2}, world_size=3) == (
        "world size (3) must be divisible by tensor x pipeline x context parallel size (2); "
        "launch a multiple of 2 processes or change the layout"
    )


def test_expert_grid_that_does_not_divide_the_world(data):
    assert _error(
        CPU_CONFIG, {**data, "expert_model_parallel_size": 4, "num_experts": 4}, world_size=2
    ) == (
        "world size (2) must be divisible by expert tensor x expert x pipeline parallel size (4); "
        "change expert_model_parallel_size or the number of processes"
    )


def test_m_k_ep_inconsistencies(data):
    assert _error(CPU_CONFIG, {**data, "moe_router_topk": 9}) == (
        "moe_router_topk (9) must be an integer in [1, num_experts + adamoe_num_null_experts = "
        "8]; lower it or add null experts (k counts picks over true and null experts)"
    )
    assert _error(CPU_CONFIG, {**data, "num_experts": 3}) == (
        "num_experts (3) must be divisible by expert_model_parallel_size (2); change the expert "
        "count or the EP size (EP shards the true experts; null experts live in the router)"
    )
    assert _error(CPU_CONFIG, {**data, "adamoe_num_null_experts": -1}) == (
        "adamoe_num_null_experts (-1) must be an integer >= 0; use 0 for plain top-k routing"
    )


def test_missing_data_and_tokenizer(tmp_path, data):
    missing = str(tmp_path / "nope")
    assert _error(CPU_CONFIG, {**data, "data_path": [missing]}) == (
        f"data_path ('{missing}') must name an indexed dataset ({missing}.bin is missing); "
        "run tools/preprocess_data.py or `make data` first"
    )
    assert _error(CPU_CONFIG, {**data, "tokenizer_model": missing}) == (
        f"tokenizer_model ('{missing}') must be an existing sentencepiece .model file; "
        "pass the model tools/preprocess_data.py wrote"
    )


def test_other_rules(data):
    assert _error(CPU_CONFIG, {**data, "lr_warmup_iters": 300}) == (
        "lr_warmup_iters (300) must be < lr_decay_iters or train_iters (300); shorten the warm-up"
    )
    assert _error(CPU_CONFIG, {**data, "global_batch_size": 12}) == (
        "global_batch_size (12) must be a multiple of micro_batch_size x data-parallel size "
        "(8 x 2); change the batch sizes"
    )
    assert _error(CPU_CONFIG, {**data, "moe_token_dispatcher_type": "a2a"}) == (
        "moe_token_dispatcher_type ('a2a') must be one of 'alltoall', 'allgather', 'flex'; "
        "pick one of them"
    )
    assert _error(CPU_CONFIG, {**data, "save": None}) == (
        "save_interval (100) must come with a save directory; set save or drop save_interval"
    )
    assert _error(None, {**data, "skip_train": True}) == (
        "skip_train (True) must come with eval_interval (the validation set size depends on it); "
        "set eval_interval"
    )
    assert _error(CPU_CONFIG, {**data, "adamoe_data_seed": -1}) == (
        "adamoe_data_seed (-1) must be in [0, 2**32); pick a non-negative 32-bit seed"
    )
    assert _error(CPU_CONFIG, {**data, "adamoe_min_load_steps": 0}) == (
        "adamoe_min_load_steps (0) must be > 0; set a positive value"
    )


def test_a_dense_model_refuses_expert_settings(data):
    dense = {**data, "num_experts": 0, "adamoe_num_null_experts": 0}
    assert _error(CPU_CONFIG, dense) == (
        "expert_model_parallel_size (2) must be 1 in a dense model (num_experts 0); drop it, or "
        "set num_experts > 0 for MoE layers"
    )
    dense["expert_model_parallel_size"] = 1
    assert _error(CPU_CONFIG, {**dense, "adamoe_num_null_experts": 4}) == (
        "adamoe_num_null_experts (4) must be 0 in a dense model (num_experts 0); drop it, or "
        "set num_experts > 0 for MoE layers"
    )
    assert _error(CPU_CONFIG, {**dense, "adamoe_target_load": 1.0}).startswith(
        "adamoe_target_load (1.0) must be None in a dense model"
    )
    assert _error(CPU_CONFIG, {**dense, "num_experts": -1}) == (
        "num_experts (-1) must be a positive integer; set it to the true experts"
    )
    args = load_arguments(CPU_CONFIG, dense, 2)
    assert args.is_dense and args.moe_layer_indices() == []


def test_missing_config_file():
    assert _error("/nonexistent.yaml", {}) == (
        "config ('/nonexistent.yaml') must be an existing YAML file; check the path"
    )


def test_command_line_that_is_not_a_flag():
    with pytest.raises(ValueError) as info:
        parse_overrides(["train_iters", "3"])
    assert str(info.value) == (
        "command-line argument ('train_iters') must be a --flag or its value; "
        "write overrides as --key value"
    )


def test_gpu_only_options_are_rejected_on_cpu(data):
    from megatron_adamoe.training.model import check_device_support

    gpu_recipe = os.path.join(REPO, "configs", "gpu_1b_adamoe.yaml")
    args = load_arguments(gpu_recipe, data, 8)
    check_device_support(args, on_gpu=True)  # nothing to object to on a GPU
    with pytest.raises(ValueError) as info:
        check_device_support(args, on_gpu=False)
    assert str(info.value) == (
        "use_distributed_optimizer (True) must be false on CPU; Megatron's distributed optimizer "
        "checkpoints its state through Apex or Transformer Engine (GPU only)"
    )
    args.use_distributed_optimizer = False
    with pytest.raises(ValueError) as info:
        check_device_support(args, on_gpu=False)
    assert str(info.value) == (
        "moe_grouped_gemm (True) must be false on CPU; it needs Transformer Engine or "
        "grouped_gemm kernels (GPU only)"
    )
    args.moe_grouped_gemm = args.moe_permute_fusion = False
    args.tensor_model_parallel_size, args.sequence_parallel = 2, True
    check_device_support(args, on_gpu=False)  # TP runs on CPU (SequenceParallelTorchNorm)
    args.tensor_model_parallel_size, args.sequence_parallel = 1, False
    args.context_parallel_size = 2
    with pytest.raises(ValueError) as info:
        check_device_support(args, on_gpu=False)
    assert str(info.value) == (
        "context_parallel_size (2) must be 1 on CPU; context parallel attention is Transformer "
        "Engine's (GPU only)"
    )


def test_tensor_parallel_moe_needs_sequence_parallel(data):
    overrides = {**data, "tensor_model_parallel_size": 2, "expert_model_parallel_size": 1}
    assert _error(CPU_CONFIG, overrides) == (
        "sequence_parallel (False) must be true when tensor_model_parallel_size > 1 with MoE "
        "layers (Megatron-Core requires it); add --sequence-parallel"
    )
    load_arguments(CPU_CONFIG, {**overrides, "sequence_parallel": True}, 2)


def test_layout_and_shape_rules(data):
    assert _error(CPU_CONFIG, {**data, "moe_layer_freq": 0}) == (
        "moe_layer_freq (0) must be >= 1 (every freq-th layer is MoE) or a 0/1 list per layer; "
        "fix the value"
    )
    assert _error(CPU_CONFIG, {**data, "moe_layer_freq": [1, 0]}) == (
        "moe_layer_freq ([1, 0]) must list 0/1 for each of the 4 layers; fix the list"
    )
    assert _error(
        CPU_CONFIG,
        {
            **data,
            "moe_layer_freq": [1, 1, 0, 0],
            "pipeline_model_parallel_size": 2,
            "expert_model_parallel_size": 1,
        },
    ) == (
        "moe_layer_freq ([1, 1, 0, 0]) must put an MoE layer on every pipeline stage (stage 1 of "
        "2 has none); change moe_layer_freq or pipeline_model_parallel_size"
    )
    assert _error(
        CPU_CONFIG,
        {
            **data,
            "tensor_model_parallel_size": 2,
            "expert_model_parallel_size": 1,
            "num_attention_heads": 4,
            "ffn_hidden_size": 255,
        },
    ) == (
        "ffn_hidden_size (255) must be divisible by tensor_model_parallel_size (2); "
        "change either value"
    )
    assert _error(CPU_CONFIG, {**data, "max_position_embeddings": 64}) == (
        "max_position_embeddings (64) must be >= seq_length (256); raise it"
    )
    assert _error(CPU_CONFIG, {**data, "split": "100,0,0"}) == (
        "split ('100,0,0') must give the validation set a share when eval_interval is set; "
        "e.g. '98,2,0', or drop eval_interval"
    )
    assert _error(CPU_CONFIG, {**data, "split": "98,2"}) == (
        "split ('98,2') must be three non-negative weights 'train,valid,test'; e.g. '98,2,0'"
    )


def test_cpu_rejects_flex_dispatcher_and_tied_embeddings_across_stages(data):
    from megatron_adamoe.training.model import check_device_support

    args = load_arguments(CPU_CONFIG, {**data, "moe_token_dispatcher_type": "flex"}, 2)
    with pytest.raises(ValueError) as info:
        check_device_support(args, on_gpu=False)
    assert str(info.value) == (
        "moe_token_dispatcher_type ('flex') must be 'alltoall' or 'allgather' on CPU; the flex "
        "dispatcher runs on DeepEP (GPU only)"
    )
    args = load_arguments(
        CPU_CONFIG,
        {
            **data,
            "pipeline_model_parallel_size": 2,
            "expert_model_parallel_size": 1,
            "untie_embeddings_and_output_weights": False,
        },
        2,
    )
    with pytest.raises(ValueError) as info:
        check_device_support(args, on_gpu=False)
    assert str(info.value) == (
        "untie_embeddings_and_output_weights (False) must be true on CPU with pipeline stages; "
        "Megatron syncs tied embeddings across stages on CUDA"
    )


def test_fp8_and_transformer_engine_selection(data):
    """FP8 and the TE spec are chosen and checked without Transformer Engine installed."""
    from megatron_adamoe.training.model import check_device_support, layer_spec_backend

    assert _error(CPU_CONFIG, {**data, "fp8_format": "hybrid"}) == (
        "fp8_format ('hybrid') must come with bf16 (FP8 GEMMs keep bf16 weights and "
        "activations); add --bf16"
    )
    assert _error(CPU_CONFIG, {**data, "fp8_recipe": "nvfp4"}) == (
        "fp8_recipe ('nvfp4') must be one of 'delayed', 'tensorwise', 'blockwise', 'mxfp8'; "
        "pick one of them"
    )
    args = load_arguments(
        CPU_CONFIG,
        {
            **data,
            "fp8_format": "hybrid",
            "bf16": True,
            "fp8_recipe": "mxfp8",
            "moe_grouped_gemm": True,
        },
        2,
    )
    with pytest.raises(ValueError) as info:
        check_device_support(args, on_gpu=False)
    assert str(info.value) == (
        "fp8_format ('hybrid') must be null on CPU; FP8 GEMMs are Transformer Engine's (GPU only)"
    )
    with pytest.raises(ValueError) as info:
        check_device_support(args, on_gpu=True, capability=(9, 0))
    assert str(info.value) == (
        "fp8_recipe ('mxfp8') must run on compute capability 10.0+ (this "
        "GPU: 9.0); use 'delayed' or 'tensorwise'"
    )
    check_device_support(args, on_gpu=True, capability=(10, 0))
    args.fp8_recipe = "blockwise"
    check_device_support(args, on_gpu=True, capability=(9, 0))
    with pytest.raises(ValueError, match=r"compute capability 9.0\+ \(this GPU: 8.0\)"):
        check_device_support(args, on_gpu=True, capability=(8, 0))

    assert layer_spec_backend(args, on_gpu=True, has_te=True) == "transformer_engine"
    with pytest.raises(ValueError) as info:
        layer_spec_backend(args, on_gpu=True, has_te=False)
    assert str(info.value) == (
        "fp8_format ('hybrid') must be off without Transformer Engine; install it (pip install "
        "megatron-adamoe[gpu]) or drop the option"
    )
    args.fp8_format = None
    with pytest.raises(ValueError, match=r"^moe_grouped_gemm \(True\) must be off without"):
        layer_spec_backend(args, on_gpu=True, has_te=False)
    args.moe_grouped_gemm = False
    assert layer_spec_backend(args, on_gpu=True, has_te=False) == "local"
    assert layer_spec_backend(args, on_gpu=False, has_te=False) == "local"


def test_fp8_options_stay_off_the_cpu_transformer_config(data):
    """(With fp8 set, TransformerConfig checks the Transformer Engine version, so the GPU side
    of this mapping runs in tests/gpu only.)"""
    from megatron_adamoe.training.model import transformer_config

    args = load_arguments(
        CPU_CONFIG, {**data, "fp8_format": "hybrid", "bf16": True, "fp8_recipe": "tensorwise"}, 2
    )
    config = transformer_config(args, on_gpu=False)
    assert (config.fp8, config.bf16) == (None, False)


def test_top1_routing_builds_megatrons_pre_softmax_config(data):
    """Megatron requires moe_router_pre_softmax with top-1: weight norm 'none' is that."""
    from megatron_adamoe.training.model import transformer_config

    args = load_arguments(
        CPU_CONFIG,
        {**data, "moe_router_topk": 1, "adamoe_num_null_experts": 0, "adamoe_weight_norm": "none"},
        2,
    )
    config = transformer_config(args, on_gpu=False)
    assert config.moe_router_pre_softmax and config.moe_router_topk == 1


def test_megatrons_own_config_errors_are_one_line_option_errors(data, monkeypatch):
    from megatron_adamoe.errors import OptionError
    from megatron_adamoe.training import model

    def megatron_rejects(args, on_gpu):
        raise ValueError("Please use --moe-router-pre-softmax when topk is 1.")

    monkeypatch.setattr(model, "_transformer_config", megatron_rejects)
    with pytest.raises(OptionError) as info:
        model.transformer_config(load_arguments(CPU_CONFIG, data, 2), on_gpu=False)
    assert str(info.value) == (
        "Megatron-Core rejects these options: Please use --moe-router-pre-softmax when topk is 1."
    )
