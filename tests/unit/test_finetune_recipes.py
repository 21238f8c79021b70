"""adamoe-finetune's recipes (--config YAML), epochs with one aux coefficient per epoch, and the
LoRA / QLoRA settings: what they set, and each bad value as one line."""

from __future__ import annotations

import glob
import json
import os
import sys

import pytest
import torch

from megatron_adamoe.errors import OptionError
from megatron_adamoe.hf.finetune import check, parse_flags
from tests.runs import REPO

RECIPES = sorted(glob.glob(os.path.join(REPO, "configs", "finetune", "*.yaml")))


def _args(tmp_path, *extra, architecture="AdaMoEForCausalLM"):
    model = tmp_path / "model"
    model.mkdir(exist_ok=True)
    (model / "config.json").write_text(json.dumps({"architectures": [architecture]}))
    return [
        "--model",
        str(model),
        "--data",
        "x.jsonl",
        "--output-dir",
        str(tmp_path / "out"),
        *extra,
    ]


def _error(call) -> str:
    with pytest.raises(OptionError) as error:
        call()
    assert "\n" not in str(error.value)
    return str(error.value)


def test_the_paper_recipes_and_their_cpu_twins_parse_and_pass_the_checks(tmp_path):
    assert [os.path.basename(path) for path in RECIPES] == [
        "cpu_table1_adamoe_qlora.yaml",
        "cpu_table2_molora.yaml",
        "paper_table1_mixtral_qlora.yaml",
        "paper_table2_llama_molora.yaml",
    ]
    for path in RECIPES:
        dense = "table2" in path
        options = parse_flags(
            _args(
                tmp_path,
                "--config",
                path,
                architecture="LlamaForCausalLM" if dense else "AdaMoEForCausalLM",
            )
        )
        check(options)
        assert options.num_epochs == 2 and options.lora_rank == 8
        if dense:
            assert (options.method, options.learning_rate) == ("mo-lora", 3e-4)
            assert options.mo_lora_experts == 4 and options.aux_loss_coef == 0.001
        else:
            assert (options.method, options.learning_rate) == ("qlora", 5e-5)
            assert options.lora_target_modules == ["gate", "w1", "w2", "w3"]
            assert options.aux_loss_coef_per_epoch == [0.01, 0.001]
    # the command line wins over the recipe
    options = parse_flags(_args(tmp_path, "--config", RECIPES[0], "--learning-rate", "1e-3"))
    assert options.learning_rate == 1e-3 and options.method == "qlora"


def test_a_recipe_may_hold_the_paths_and_missing_paths_are_named(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {tmp_path}\ndata: [a.jsonl, b.jsonl]\noutput_dir: {tmp_path}/o\n")
    options = parse_flags(["--config", str(recipe)])
    assert (options.model, options.data) == (str(tmp_path), ["a.jsonl", "b.jsonl"])
    with pytest.raises(SystemExit):
        parse_flags(["--model", "m"])
    assert (
        "the following arguments are required (on the command line or in --config): --data, "
        "--output-dir" in capsys.readouterr().err
    )


@pytest.mark.parametrize(
    "text, message",
    [
        (
            "learning_rat: 1e-4\n",
            "key 'learning_rat' is not a flag of adamoe-finetune; use the "
            "flags' names, e.g. learning_rate: 5.0e-5 (adamoe-finetune --help lists them)",
        ),
        ("max_steps: ten\n", "max_steps ('ten') must be of type int"),
        ("method: dora\n", "method ('dora') must be one of full, lora, qlora, mo-lora, ada-k"),
        ("seed: [1, 2]\n", "seed ([1, 2]) must be one value, not a list"),
        ("bf16: 1\n", "bf16 (1) must be true or false"),
        ("- a\n- b\n", "must be a mapping of flag names to values"),
    ],
)
def test_bad_recipes_are_one_line(tmp_path, text, message):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(text)
    line = _error(lambda: parse_flags(_args(tmp_path, "--config", str(recipe))))
    assert line.startswith(f"config ({str(recipe)!r})") and line.endswith(message), line
    missing = str(tmp_path / "none.yaml")
    assert _error(lambda: parse_flags(_args(tmp_path, "--config", missing))) == (
        f"config ({missing!r}) must be an existing YAML recipe; see configs/finetune/"
    )


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--num-epochs", "0"], "num_epochs (0) must be >= 1; pass a positive --num-epochs"),
        (
            ["--aux-loss-coef-per-epoch", "0.01", "0.001"],
            "aux_loss_coef_per_epoch (0.01 0.001) needs --num-epochs 2 (one coefficient per "
            "epoch); got num_epochs (None)",
        ),
        (
            ["--num-epochs", "2", "--aux-loss-coef-per-epoch", "0.01", "-1"],
            "aux_loss_coef_per_epoch (0.01 -1.0) values must be >= 0",
        ),
        (
            ["--num-epochs", "1", "--aux-loss-coef-per-epoch", "0.01", "--aux-loss-coef", "0.1"],
            "aux_loss_coef_per_epoch must not be combined with aux_loss_coef (0.1); keep only "
            "one of them",
        ),
        (
            ["--method", "lora", "--lora-rank", "0"],
            "lora_rank (0) must be >= 1; pass a positive --lora-rank",
        ),
        (
            ["--method", "lora", "--lora-alpha", "0"],
            "lora_alpha (0.0) must be > 0; pass a positive --lora-alpha",
        ),
        (
            ["--method", "qlora", "--lora-dropout", "1"],
            "lora_dropout (1.0) must be in [0, 1); e.g. --lora-dropout 0.05",
        ),
    ],
)
def test_bad_epoch_and_lora_settings_are_one_line(tmp_path, extra, message):
    assert _error(lambda: check(parse_flags(_args(tmp_path, *extra)))) == message


def test_qlora_under_deepspeed_is_refused(tmp_path):
    ds = tmp_path / "ds.json"
    ds.write_text("{}")
    assert _error(
        lambda: check(parse_flags(_args(tmp_path, "--method", "qlora", "--deepspeed", str(ds))))
    ) == (
        f"deepspeed ({str(ds)!r}) cannot partition a 4-bit base (method qlora); run qlora in one "
        "process or under torchrun (DDP), or use --method lora with DeepSpeed"
    )


def test_epochs_set_the_steps_and_the_per_epoch_coefficients(tmp_path):
    from megatron_adamoe.hf.finetune import _set_steps

    options = parse_flags(
        _args(
            tmp_path,
            "--num-epochs",
            "2",
            "--aux-loss-coef-per-epoch",
            "0.01",
            "0.001",
            "--per-device-batch-size",
            "4",
        )
    )
    check(options)
    _set_steps(options, blocks=43)  # 10 steps per epoch, the last 3 blocks dropped
    assert options.max_steps == 20
    assert options.aux_loss_coef_schedule == "piecewise:0.01,10:0.001"
    too_few = parse_flags(_args(tmp_path, "--num-epochs", "1", "--per-device-batch-size", "4"))
    assert _error(lambda: _set_steps(too_few, blocks=3)) == (
        "num_epochs (1) needs at least one step per epoch: the data make 3 rows (blocks or "
        "examples) for a global batch of 4; add data or lower --seq-length / the batch"
    )


def test_lora_targets_must_name_linears_of_the_model():
    from megatron_adamoe.adapters.peft_lora import MOE_TARGETS, check_targets
    from megatron_adamoe.hf import AdaMoEForCausalLM
    from tests.hf_models import one_layer_adamoe_config

    config = one_layer_adamoe_config()
    model = AdaMoEForCausalLM(config)
    check_targets(model, MOE_TARGETS + ("q_proj", "o_proj"))
    assert _error(lambda: check_targets(model, ["gate", "up_proj"])) == (
        "lora_target_modules ('up_proj') names no linear layer of the model; its linears are: "
        "gate, k_proj, lm_head, o_proj, q_proj, v_proj, w1, w2, w3"
    )


def test_qlora_without_bitsandbytes_is_one_line(monkeypatch):
    from megatron_adamoe.adapters.peft_lora import quantization_config

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    assert _error(lambda: quantization_config(torch.float32)) == (
        "method qlora needs bitsandbytes (import of bitsandbytes halted; None in sys.modules); "
        "install the finetune extra (pip install 'megatron-adamoe[finetune]') or use --method lora"
    )
