"""Export -> import reproduces every tensor; the exported model loads through the Auto classes
without remote code; corrupt or mismatched inputs fail with one line."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from tests.conversion import convert, convert_command, remote_code_run


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    """(checkpoint, HF dir): identity nulls, EP = 2 (GQA), a few steps; exported in shards by
    the installed console script (the one run of ``adamoe-convert`` in a process of its own)."""
    from tests.convert.test_export import case_options

    checkpoint = trained(*case_options("EP2-identity-true_experts"))
    out = tmp_path_factory.mktemp("roundtrip") / "hf"
    done = convert_command(
        "export-hf", "--load", checkpoint, "--out", out, "--max-shard-size", "200KB"
    )
    assert done.returncode == 0 and done.stderr.strip().endswith(f"wrote {out}"), done.stderr
    return checkpoint, out


def _model_tensors(checkpoint):
    from megatron_adamoe.hf.megatron_checkpoint import find_checkpoint, read_model_tensors

    return read_model_tensors(find_checkpoint(str(checkpoint)))


def _safetensors(directory):
    from megatron_adamoe.hf.import_hf import read_hf_tensors

    return read_hf_tensors(str(directory))


def test_export_import_round_trip_reproduces_every_tensor(exported, tmp_path):
    checkpoint, hf_dir = exported
    convert("import-hf", "--hf", hf_dir, "--out", tmp_path / "back", "--ep", "2")
    original, back = _model_tensors(checkpoint), _model_tensors(tmp_path / "back")
    assert sorted(back) == sorted(original)
    for name, tensor in original.items():
        assert torch.equal(back[name], tensor), name
    # and on to HF again: the same safetensors
    convert(
        "export-hf",
        "--load",
        tmp_path / "back",
        "--out",
        tmp_path / "hf2",
        "--tokenizer-model",
        hf_dir / "tokenizer.model",
    )
    first, second = _safetensors(hf_dir), _safetensors(tmp_path / "hf2")
    assert sorted(first) == sorted(second)
    assert all(torch.equal(first[name], second[name]) for name in first)


def test_exported_model_loads_without_remote_code_once_registered(exported, tmp_path):
    import sentencepiece as spm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import megatron_adamoe.hf as adamoe_hf

    _, hf_dir = exported
    local = AutoModelForCausalLM.from_pretrained(hf_dir)  # no trust_remote_code
    assert type(local) is adamoe_hf.AdaMoEForCausalLM
    tokens = torch.randint(0, 256, (1, 24), generator=torch.Generator().manual_seed(3))
    remote = remote_code_run(hf_dir, tokens, tokens[:, :4], 4, tmp_path)
    with torch.no_grad():
        assert torch.equal(local.eval()(tokens).logits, remote["logits"])

    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    assert type(tokenizer) is adamoe_hf.AdaMoETokenizer
    reference = spm.SentencePieceProcessor(model_file=str(hf_dir / "tokenizer.model"))
    text = "To be, or not to be: that is the question.\nWhether 'tis nobler  in the mind"
    assert tokenizer(text)["input_ids"] == reference.encode(text)
    assert tokenizer.decode(reference.encode(text)) == reference.decode(reference.encode(text))


def _copy(source, target):
    shutil.copytree(source, target)
    return target


def _edit_config(directory, **changes):
    path = directory / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def _one_line_error(*args):
    result = convert(*args, check=False)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0][len("error: ") :]


def test_corrupt_or_mismatched_inputs_fail_with_one_line(exported, tmp_path):
    checkpoint, hf_dir = exported
    iteration = sorted(p for p in os.listdir(checkpoint) if p.startswith("iter_"))[-1]

    broken = _copy(checkpoint, tmp_path / "ckpt_missing_shard")
    os.remove(broken / iteration / "__1_0.distcp")
    assert _one_line_error("export-hf", "--load", broken, "--out", tmp_path / "x") == (
        f"load ({str(broken / iteration)!r}) must hold a complete checkpoint (missing shard "
        "__1_0.distcp); copy the checkpoint again"
    )

    missing_shard = _copy(hf_dir, tmp_path / "hf_missing_shard")
    os.remove(missing_shard / "model-00002-of-00004.safetensors")
    assert _one_line_error("import-hf", "--hf", missing_shard, "--out", tmp_path / "y") == (
        f"hf ({str(missing_shard)!r}) must contain every shard its index names; missing: "
        "model-00002-of-00004.safetensors"
    )

    wrong_experts = _copy(hf_dir, tmp_path / "hf_wrong_experts")
    _edit_config(wrong_experts, num_local_experts=3)
    assert _one_line_error("import-hf", "--hf", wrong_experts, "--out", tmp_path / "z") == (
        f"hf ({str(wrong_experts)!r}) must hold exactly the tensors of its config; unexpected: "
        + ", ".join(
            f"model.layers.{layer}.block_sparse_moe.experts.3.{w}.weight"
            for layer in (0, 1)
            for w in ("w1", "w2", "w3")
        )
    )

    wrong_width = _copy(hf_dir, tmp_path / "hf_wrong_width")
    _edit_config(wrong_width, moe_intermediate_size=32)
    message = _one_line_error("import-hf", "--hf", wrong_width, "--out", tmp_path / "w")
    assert message.startswith(
        "converted tensors must match the target model tensor for tensor; mis-shaped: "
        "decoder.layers.0.mlp.experts.local_experts.0.linear_fc1.weight (128, 64) != (64, 64), "
    )

    unknown = _copy(hf_dir, tmp_path / "hf_llama")
    _edit_config(unknown, architectures=["LlamaForCausalLM"])
    assert _one_line_error("import-hf", "--hf", unknown, "--out", tmp_path / "v") == (
        "architectures (['LlamaForCausalLM']) must be one of ('MixtralForCausalLM', "
        f"'AdaMoEForCausalLM'); {unknown / 'config.json'} describes a model this converter does "
        "not know"
    )

    sliding = _copy(hf_dir, tmp_path / "hf_sliding")
    _edit_config(sliding, sliding_window=4096)
    assert _one_line_error("import-hf", "--hf", sliding, "--out", tmp_path / "s") == (
        f"sliding_window (4096) must be None to import; {sliding / 'config.json'} describes a "
        "model Megatron's AdaMoE GPT does not reproduce"
    )

    not_a_model = tmp_path / "hf_llama" / "config.json"  # any file that is not sentencepiece
    assert _one_line_error(
        "export-hf", "--load", checkpoint, "--out", tmp_path / "r", "--tokenizer-model", not_a_model
    ) == (
        f"tokenizer_model ({str(not_a_model)!r}) must be a sentencepiece model; pass the run's "
        "(RuntimeError)"
    )
    assert _one_line_error(
        "export-hf", "--load", checkpoint, "--out", tmp_path / "q", "--max-shard-size", "lots"
    ) == (
        "max_shard_size ('lots') must be a byte count like 5GB, 500MB or 1000000; fix "
        "--max-shard-size"
    )

    assert _one_line_error(
        "import-hf", "--hf", hf_dir, "--out", tmp_path / "u", "--num-null-experts", "2"
    ) == ("num_null_experts (2) must equal the AdaMoE model's m (4); drop --num-null-experts")
    assert _one_line_error("export-hf", "--load", checkpoint, "--out", hf_dir) == (
        f"out ({str(hf_dir)!r}) must not exist yet; remove it or pick another path"
    )
    assert _one_line_error(
        "export-hf", "--load", tmp_path / "nowhere", "--out", tmp_path / "t"
    ) == (f"load ({str(tmp_path / 'nowhere')!r}) must be a checkpoint directory; check the path")
    # nothing half-written anywhere
    assert not [name for name in os.listdir(tmp_path) if ".tmp-" in name]
    assert (
        sorted(name for name in os.listdir(tmp_path) if not name.startswith(("ckpt", "hf"))) == []
    )
