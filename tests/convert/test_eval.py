"""adamoe-eval as a user runs it: a local multiple-choice task scored by lm-evaluation-harness
(accuracy equal to an independent scoring of each choice's log-likelihood), with the measured
Load and FLOPs; adapters (PEFT, Mo-LoRA) loaded; bad inputs one line each."""

from __future__ import annotations

import json
import random

import pytest
import torch

from tests.hf_models import tiny_adamoe

pytest.importorskip("lm_eval")
pytestmark = pytest.mark.distributed  # lm-eval's simple_evaluate runs `git describe`


@pytest.fixture(scope="module")
def model_and_task(tmp_path_factory):
    from megatron_adamoe.data.corpus import synthetic_documents

    root = tmp_path_factory.mktemp("eval")
    tiny_adamoe(root / "model", "\n".join(synthetic_documents(80, seed=0)))
    rng = random.Random(0)
    objects = ["the crown", "the storm", "a letter", "her ring"]
    with open(root / "task.jsonl", "w") as handle:
        for _ in range(10):
            record = {
                "question": f"{rng.choice(['the king', 'a fool'])} speaks of",
                "choices": rng.sample(objects, 4),
                "answer": rng.randrange(4),
            }
            handle.write(json.dumps(record) + "\n")
    return root


def _eval(capsys, *args) -> tuple[int, str, str]:
    from megatron_adamoe.evaluation.cli import main

    status = main([str(arg) for arg in args])
    out, err = capsys.readouterr()
    return status, out, err


def _independent_accuracy(root) -> tuple[float, float]:
    """Each choice's summed log-probability after the prompt, encoded as lm-eval's HFLM encodes
    a causal pair (the whole string, split at the context's length); acc: the best sum, acc_norm:
    the best sum per character of the choice."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import megatron_adamoe.hf  # noqa: F401

    model = AutoModelForCausalLM.from_pretrained(root / "model", dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(root / "model")
    hits = hits_norm = 0
    records = [json.loads(line) for line in open(root / "task.jsonl")]
    for record in records:
        context = record["question"] + "\nAnswer:"
        scores = []
        for choice in record["choices"]:
            whole = tokenizer.encode(context + " " + choice)
            context_ids = tokenizer.encode(context)
            with torch.no_grad():
                logits = model(torch.tensor([whole[:-1]])).logits[0]
            log_probs = torch.log_softmax(logits, -1)
            positions = range(len(context_ids) - 1, len(whole) - 1)
            scores.append(sum(float(log_probs[p, whole[p + 1]]) for p in positions))
        hits += max(range(4), key=lambda i: scores[i]) == record["answer"]
        normed = [s / len(c) for s, c in zip(scores, record["choices"])]
        hits_norm += max(range(4), key=lambda i: normed[i]) == record["answer"]
    return hits / len(records), hits_norm / len(records)


def test_a_shipped_task_is_scored_as_an_independent_loop_scores_it(
    model_and_task, capsys, tmp_path, monkeypatch
):
    """configs/tasks/shakespeare_speaker.yaml (its data path relative to the working directory,
    as make tasks writes it) read by lm-eval; the Load against expert rows counted by hooks of
    this test on the same forwards."""
    import shutil

    import megatron_adamoe.evaluation.cli as cli
    from tests.runs import REPO

    root = model_and_task
    (tmp_path / "data" / "tasks" / "shakespeare").mkdir(parents=True)
    shutil.copyfile(root / "task.jsonl", tmp_path / "data/tasks/shakespeare/speaker_test.jsonl")
    monkeypatch.chdir(tmp_path)
    rows, tokens = {}, {}
    load_model = cli.load_model

    def counting(*args):
        model, tokenizer = load_model(*args)
        for i, layer in enumerate(model.model.layers):
            block = layer.block_sparse_moe
            block.register_forward_hook(
                lambda m, x, y, i=i: tokens.__setitem__(i, tokens.get(i, 0) + y[1].size(0))
            )
            for expert in block.experts:
                expert.register_forward_hook(
                    lambda m, x, y, i=i: rows.__setitem__(i, rows.get(i, 0) + x[0].size(0))
                )
        return model, tokenizer

    monkeypatch.setattr(cli, "load_model", counting)
    out = tmp_path / "results.json"
    status, table, _ = _eval(
        capsys, "--model", root / "model", "--include-path", f"{REPO}/configs/tasks",
        "--tasks", "shakespeare_speaker", "--baseline-topk", "2", "--output", out,
    )  # fmt: skip
    assert status == 0
    result = json.loads(out.read_text())["tasks"]["shakespeare_speaker"]
    acc, acc_norm = _independent_accuracy(root)
    assert (result["acc"], result["acc_norm"]) == (acc, acc_norm)
    assert result["acc_stderr"] > 0 and result["samples"] == 10
    assert result["load"] == [round(rows[i] / tokens[i], 4) for i in range(2)]
    assert 0 < result["load_mean"] < 3
    # the null-biased routers pick nulls: fewer expert FLOPs than top-2
    assert result["expert_flops_pct"] == pytest.approx(100 * (result["load_mean"] / 2 - 1))
    assert result["model_flops_pct"] < 0
    assert table.splitlines()[0] == "|  | shakespeare_speaker | mean |"
    assert table.splitlines()[3].startswith(f"| Load | {result['load_mean']:.2f} |")


def test_the_validation_text_is_scored_in_bits_per_byte_as_an_independent_loop_scores_it(
    model_and_task, capsys, tmp_path, monkeypatch
):
    """configs/tasks/shakespeare_validation.yaml (lm-eval's rolling log-likelihood): bits per
    byte = the documents' summed negative log-likelihood after lm-eval's prefix token (BOS) over
    their UTF-8 bytes, in bits, each document one window here; --topk 1 routes one pick."""
    import math

    from transformers import AutoModelForCausalLM, AutoTokenizer

    import megatron_adamoe.hf  # noqa: F401
    from tests.runs import REPO

    documents = ["the king speaks of the crown", "a fool speaks of her ring and a letter"]
    (tmp_path / "data" / "tasks" / "shakespeare").mkdir(parents=True)
    with open(tmp_path / "data/tasks/shakespeare/validation.jsonl", "w") as handle:
        handle.writelines(json.dumps({"play": "p", "text": text}) + "\n" for text in documents)
    monkeypatch.chdir(tmp_path)
    results = {}
    for topk in (None, 1):
        out = tmp_path / f"topk{topk}.json"
        status, table, _ = _eval(
            capsys, "--model", model_and_task / "model", "--include-path", f"{REPO}/configs/tasks",
            "--tasks", "shakespeare_validation", "--baseline-topk", "2", "--output", out,
            *(["--topk", topk] if topk else []),
        )  # fmt: skip
        assert status == 0
        results[topk] = json.loads(out.read_text())["tasks"]["shakespeare_validation"]
    assert table.splitlines()[2].startswith(f"| Bits/byte | {results[1]['bits_per_byte']:.4f} |")
    model = AutoModelForCausalLM.from_pretrained(model_and_task / "model", dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_and_task / "model")
    nll = 0.0
    for text in documents:
        ids = [tokenizer.bos_token_id] + tokenizer.encode(text, add_special_tokens=False)
        with torch.no_grad():
            log_probs = torch.log_softmax(model.eval()(torch.tensor([ids[:-1]])).logits[0], -1)
        nll -= float(log_probs.gather(1, torch.tensor(ids[1:]).unsqueeze(1)).sum())
    want = nll / sum(len(text.encode()) for text in documents) / math.log(2)
    assert results[None]["bits_per_byte"] == pytest.approx(want, rel=1e-5)
    assert results[None]["samples"] == 2 and "acc" not in results[None]
    # One pick over the n + m experts instead of three: at most one true expert per token, and
    # never more than the top-3 routing's, in every layer (its null bias keeps that below 1).
    one, three = results[1]["load"], results[None]["load"]
    assert all(a <= min(b, 1) for a, b in zip(one, three)) and one != three
    assert results[1]["bits_per_byte"] != results[None]["bits_per_byte"]


def test_adapters_are_evaluated_on_their_base(model_and_task, capsys, tmp_path):
    """PEFT adapters (merged for evaluation) change the scores of the base; the merged model's
    own directory gives the same numbers."""
    from megatron_adamoe.adapters.peft_lora import apply_lora, lora_settings, save_lora
    from megatron_adamoe.evaluation.cli import load_model

    root = model_and_task
    base, _ = load_model(str(root / "model"), None)
    wrapped = apply_lora(base, lora_settings(8, 16, 0.0))
    torch.manual_seed(1)
    for name, parameter in wrapped.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.3)
    save_lora(wrapped, str(tmp_path / "adapter"))
    task = f"speaks={root / 'task.jsonl'}"
    runs = {}
    for label, extra in (("base", []), ("adapter", ["--adapter", tmp_path / "adapter"])):
        out = tmp_path / f"{label}.json"
        status, _, _ = _eval(capsys, "--model", root / "model", "--tasks", task,
                             "--baseline-topk", "2", "--output", out, *extra)  # fmt: skip
        assert status == 0
        runs[label] = json.loads(out.read_text())["tasks"]["speaks"]
    assert runs["adapter"]["load"] != runs["base"]["load"]


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["--tasks", "a,=x"],
            "tasks ('a,=x') must be comma-separated NAME or NAME=FILE.jsonl "
            "items, e.g. next_line=tasks/next_line_test.jsonl",
        ),
        (
            ["--tasks", "a=/no/such.jsonl"],
            "tasks ('a=/no/such.jsonl') names no file '/no/such.jsonl'; check the path",
        ),
        (
            ["--tasks", "no_such_task_here", "--baseline-topk", "2"],
            "tasks ('no_such_task_here') "
            "is no task lm-eval knows here; give NAME=FILE.jsonl or a YAML in --include-path",
        ),
        (
            ["--tasks", "TASK"],
            "baseline_topk must be given for a model with null experts (its k "
            "counts null picks); e.g. --baseline-topk 2 for a top-2 model converted to AdaMoE",
        ),
        (
            ["--tasks", "TASK", "--baseline-topk", "0"],
            "baseline_topk (0) must be >= 1; fix --baseline-topk",
        ),
        (["--tasks", "TASK", "--limit", "0"], "limit (0) must be >= 1; fix --limit"),
        (["--tasks", "TASK", "--topk", "0"], "topk (0) must be >= 1; fix --topk"),
        (
            ["--tasks", "TASK", "--topk", "9", "--baseline-topk", "2"],
            "topk (9) must be <= the model's 8 experts (4 true + 4 null); lower --topk",
        ),
    ],
)
def test_bad_inputs_are_one_line(model_and_task, capsys, args, message):
    root = model_and_task
    args = [a.replace("TASK", f"speaks={root / 'task.jsonl'}") for a in args]
    status, _, err = _eval(capsys, "--model", root / "model", *args)
    assert status == 2 and err.strip() == f"error: {message}"


def test_mo_lora_adapters_on_a_dense_base_report_their_lora_load(tmp_path, capsys):
    from transformers import LlamaForCausalLM

    from megatron_adamoe.adapters import MoLoRAConfig, apply_mo_lora, save_mo_lora
    from tests.hf_models import save_standard_tokenizer, tiny_llama_config

    save_standard_tokenizer(tmp_path / "llama", "fast")
    torch.manual_seed(0)
    config = tiny_llama_config()
    LlamaForCausalLM(config).save_pretrained(tmp_path / "llama")  # fmt: skip
    model = apply_mo_lora(LlamaForCausalLM(config), MoLoRAConfig(num_null_experts=4, topk=2))
    save_mo_lora(model, str(tmp_path / "molora"))
    with open(tmp_path / "task.jsonl", "w") as handle:
        for i in range(4):
            handle.write(json.dumps({"question": f"q{i}", "choices": ["a b", "c"], "answer": 0}))
            handle.write("\n")
    out = tmp_path / "r.json"
    args = ["--model", tmp_path / "llama", "--adapter", tmp_path / "molora",
            "--tasks", f"t={tmp_path / 'task.jsonl'}", "--output", out]  # fmt: skip
    status, _, err = _eval(capsys, *args)
    assert status == 2 and err.strip().endswith(
        "error: baseline_topk must be given for Mo-LoRA adapters with null experts (their k "
        "counts null picks); e.g. --baseline-topk 2 for plain top-2 MoLA"
    )
    status, _, err = _eval(capsys, *args, "--baseline-topk", "2", "--topk", "1")
    assert status == 2 and err.strip().endswith(
        f"error: topk (1) needs a model with routed experts; {tmp_path / 'llama'} has no "
        "num_experts_per_tok: drop --topk"
    )
    status, _, _ = _eval(capsys, *args, "--baseline-topk", "2")
    assert status == 0
    result = json.loads(out.read_text())["tasks"]["t"]
    assert len(result["load"]) == 2 and all(0 <= load <= 2 for load in result["load"])
    assert result["expert_flops_pct"] == pytest.approx(100 * (result["load_mean"] / 2 - 1))
