"""adamoe-finetune's flags: each bad value is one line naming the flag, its value and the fix;
the deepspeed launcher's --local_rank is accepted."""

from __future__ import annotations

import pytest

from megatron_adamoe.errors import OptionError
from megatron_adamoe.hf.finetune import check, parse_flags


def _options(tmp_path, *extra):
    model = tmp_path / "model"
    model.mkdir(exist_ok=True)
    if not (model / "config.json").exists():
        (model / "config.json").write_text('{"architectures": ["AdaMoEForCausalLM"]}')
    return parse_flags(
        ["--model", str(model), "--data", "x.jsonl", "--output-dir", str(tmp_path / "out"), *extra]
    )


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--max-steps", "0"], "max_steps (0) must be >= 1; pass a positive --max-steps"),
        (
            ["--learning-rate", "0"],
            "learning_rate (0.0) must be > 0; pass a positive --learning-rate",
        ),
        (
            ["--load-controller-rate", "-1"],
            "load_controller_rate (-1.0) must be > 0; pass a positive --load-controller-rate",
        ),
        (
            ["--aux-loss-coef", "-0.1"],
            "aux_loss_coef (-0.1) must be >= 0; use 0 to turn the load-balancing loss off",
        ),
    ],
)
def test_bad_values_are_one_line(tmp_path, extra, message):
    with pytest.raises(OptionError) as error:
        check(_options(tmp_path, *extra))
    assert str(error.value) == message


def test_the_deepspeed_launchers_local_rank_is_accepted(tmp_path):
    options = _options(tmp_path, "--local_rank=1")
    check(options)
    assert options.local_rank == 1


def _check_error(options, world_size: int = 1) -> str:
    with pytest.raises(OptionError) as error:
        check(options, world_size)
    assert "\n" not in str(error.value)
    return str(error.value)


def test_bad_inputs_before_any_work_are_one_line_each(tmp_path):
    """What used to end in a traceback (or train first): each is one line naming the input."""
    import json

    options = _options(tmp_path)
    model_config = tmp_path / "model" / "config.json"
    model_config.write_text(json.dumps({"architectures": ["MixtralForCausalLM"]}))
    assert _check_error(options) == (
        f"model ({str(tmp_path / 'model')!r}) must be an AdaMoE model (its config.json says "
        f"MixtralForCausalLM); convert it first: adamoe-convert mixtral-to-adamoe --hf "
        f"{tmp_path / 'model'} --out {tmp_path / 'model'}-adamoe --num-null-experts 8 --topk 3"
    )
    model_config.write_text(
        json.dumps({"architectures": ["AdaMoEForCausalLM"], "max_position_embeddings": 256})
    )
    assert _check_error(_options(tmp_path, "--seq-length", "512")) == (
        "seq_length (512) must be <= the model's max_position_embeddings (256); lower --seq-length"
    )
    model_config.write_text(json.dumps({"architectures": ["AdaMoEForCausalLM"]}))
    broken = tmp_path / "ds.json"
    broken.write_text('{"train_micro_batch_size_per_gpu": "auto",\n  "zero_optimization": {,}}')
    assert _check_error(_options(tmp_path, "--deepspeed", str(broken))) == (
        f"deepspeed ({str(broken)!r}) must be valid JSON: Expecting property name enclosed in "
        "double quotes at line 2, column 25; fix the file"
    )
    fixed = tmp_path / "fixed.json"
    fixed.write_text('{"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": "auto"}')
    assert _check_error(_options(tmp_path, "--deepspeed", str(fixed)), world_size=2) == (
        f"deepspeed ({str(fixed)!r}) train_micro_batch_size_per_gpu (4) must equal "
        '--per-device-batch-size (1) or be "auto"; set it to "auto" (the flags then decide) or '
        "change the flags"
    )
    (tmp_path / "a_file").write_text("")
    under_a_file = str(tmp_path / "a_file" / "out")
    assert _check_error(
        parse_flags(
            ["--model", str(tmp_path / "model"), "--data", "x", "--output-dir", under_a_file]
        )
    ) == (
        f"output_dir ({str(tmp_path / 'a_file')!r}) must be a writable directory (File exists); "
        "the fine-tuned model is written there; pick a writable place"
    )
    (tmp_path / "out").mkdir()
    assert _check_error(options).startswith(
        f"output_dir ({str(tmp_path / 'out')!r}) must not exist yet"
    )
    (tmp_path / "out").rmdir()
    assert _check_error(_options(tmp_path, "--resume")) == (
        f"resume needs a checkpoint in checkpoint_dir ({str(tmp_path / 'out')}-checkpoints"
        "'), which is empty; drop --resume to start, or point --checkpoint-dir at the run's "
        "checkpoints"
    ).replace(f"({str(tmp_path / 'out')}-", f"('{tmp_path / 'out'}-")
    assert not (tmp_path / "out").exists()


def test_a_malformed_jsonl_line_names_its_file_and_line(tmp_path):
    from megatron_adamoe.data.corpus import iter_documents

    data = tmp_path / "train.jsonl"
    data.write_text('{"text": "one"}\n\n{"text": "two"}\n{"text": "three", oops}\n')
    with pytest.raises(OptionError) as error:
        list(iter_documents([str(data)]))
    assert str(error.value) == (
        f"{data}:4 must be one JSON object per line: Expecting property name enclosed in double "
        "quotes at column 19; fix that line"
    )


def test_mixtrals_aux_coefficient_keeps_its_pressure_on_adamoes_loss():
    """transformers' own Mixtral loss (pooled over layers) against AdaMoE's per-layer sum, at
    m = 0 with identical layers, where the rescaled coefficient makes them equal exactly."""
    import torch
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    from megatron_adamoe.hf.import_hf import aux_loss_coef_from_mixtral
    from megatron_adamoe.ops.losses import null_aware_load_balancing_loss

    layers, experts, topk, coef = 4, 8, 2, 0.02
    logits = torch.randn(32, experts, generator=torch.Generator().manual_seed(0))
    mixtral = coef * load_balancing_loss_func((logits,) * layers, experts, topk)
    picks = torch.zeros_like(logits).scatter(1, torch.topk(logits, topk).indices, 1.0)
    per_layer = null_aware_load_balancing_loss(
        torch.softmax(logits, -1), picks.sum(0), 32, topk, 0, 1.0
    )
    converted = aux_loss_coef_from_mixtral(
        {"router_aux_loss_coef": coef, "num_experts_per_tok": topk, "num_hidden_layers": layers}
    )
    assert converted == pytest.approx(coef * topk / layers)
    torch.testing.assert_close(converted * layers * per_layer, mixtral)


def test_mo_lora_method_checks_its_model_and_settings(tmp_path):
    """--method mo-lora takes a dense model (a MoE one is one line naming --method full) and its
    Mo-LoRA flags give MoLoRAConfig's one-line errors."""
    import json

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    check(_options(tmp_path, "--method", "mo-lora"))
    assert _check_error(_options(tmp_path, "--method", "mo-lora", "--mo-lora-topk", "9")) == (
        "topk (9) must be an integer in [1, num_experts + num_null_experts = 8]; lower it or "
        "add null experts (k counts picks over true and null experts)"
    )
    assert _check_error(_options(tmp_path, "--method", "mo-lora", "--lora-rank", "0")) == (
        "rank (0) must be a positive integer; e.g. 8"
    )
    (model / "config.json").write_text(json.dumps({"architectures": ["AdaMoEForCausalLM"]}))
    assert _check_error(_options(tmp_path, "--method", "mo-lora")) == (
        f"model ({str(model)!r}) must be a dense model for --method mo-lora (its config.json "
        "says AdaMoEForCausalLM, a MoE model); fine-tune MoE models with --method full"
    )


def test_aux_loss_schedule_sets_the_coefficient_at_each_step(tmp_path):
    """Paper section 3.4: a tight coefficient in epoch 1, a loose one in epoch 2, as a
    piecewise schedule over optimizer steps; the callback sets it before each step."""
    from types import SimpleNamespace

    from megatron_adamoe.hf.finetune_checks import aux_loss_schedule
    from megatron_adamoe.hf.finetune_trainer import make_aux_schedule_callback

    options = _options(tmp_path, "--aux-loss-coef-schedule", "piecewise:0.01,50:0.001")
    check(options)
    model = SimpleNamespace(
        config=SimpleNamespace(router_aux_loss_coef=None),
        mo_lora_config=SimpleNamespace(aux_loss_coef=None),
    )
    for method, read in (
        ("full", lambda: model.config.router_aux_loss_coef),
        ("mo-lora", lambda: model.mo_lora_config.aux_loss_coef),
    ):
        callback = make_aux_schedule_callback()(model, aux_loss_schedule(options), method)
        seen = []
        for step in (0, 49, 50, 99):
            callback.on_step_begin(None, SimpleNamespace(global_step=step), None)
            seen.append(read())
        assert seen == [0.01, 0.01, 0.001, 0.001]
    assert _check_error(_options(tmp_path, "--aux-loss-coef-schedule", "epochwise:0.01")) == (
        "aux_loss_coef_schedule ('epochwise:0.01') is not a schedule; use 'constant:C', "
        "'piecewise:C0,STEP1:C1,...' or 'linear:START,END,END_STEP[,START_STEP]'"
    )
    assert _check_error(
        _options(tmp_path, "--aux-loss-coef-schedule", "constant:0.1", "--aux-loss-coef", "0.1")
    ) == (
        "aux_loss_coef_schedule ('constant:0.1') must not be combined with aux_loss_coef (0.1); "
        "keep only one of them"
    )
    assert _check_error(_options(tmp_path, "--aux-loss-coef-schedule", "constant:-1")) == (
        "aux_loss_coef_schedule ('constant:-1') has a negative value; values must be >= 0"
    )


def test_ada_k_settings_are_checked_in_one_line(tmp_path):
    check(_options(tmp_path, "--method", "ada-k"))  # an AdaMoE model: fine
    options = _options(tmp_path, "--method", "ada-k", "--ppo-clip", "1.5")
    assert _check_error(options) == "adak clip (1.5) is invalid; e.g. 0.2"
    dense = tmp_path / "llama"
    dense.mkdir()
    (dense / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
    options.model, options.ppo_clip = str(dense), 0.2
    assert _check_error(options) == (
        f"model ({str(dense)!r}) must be an AdaMoE or Mixtral model for --method ada-k (its "
        "config.json says LlamaForCausalLM); pass a MoE model"
    )
