"""``adamoe-eval``: accuracy per task through lm-evaluation-harness, with the measured Load (true
experts per token, per layer and mean) and FLOPs against a top-k baseline, as the paper reports
them (Table 1: Acc., Load, %FLOPs). Perplexity tasks (lm-eval's ``loglikelihood_rolling``, e.g.
``shakespeare_validation``) report bits per byte and byte / word perplexity instead of accuracy.

    adamoe-eval --model hf/adamoe_tuned --tasks next_line=tasks/next_line_test.jsonl,speaker \\
        --include-path configs/tasks --baseline-topk 2 --output results.json
    adamoe-eval --model hf/adamoe_mixtral --adapter out/qlora ...      # PEFT (Q)LoRA adapters
    adamoe-eval --model path/to/llama --adapter out/molora ...         # Mo-LoRA adapters
    adamoe-eval --model hf/top2 --adapter out/adak ...                 # Ada-K allocators
    adamoe-eval --model hf/top2 --topk 1 ...                           # the top-2 model as top-1

``NAME=FILE.jsonl`` tasks are multiple-choice records in the fine-tuning format
(question/choices/answer) rendered with ``--mc-template`` as fine-tuning renders them; other
names are lm-eval tasks (``--include-path`` adds YAML tasks; nothing is fetched from the hub).
Each task is evaluated on its own, at batch size 1 (no padding: every token counted is real).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
from typing import Optional

from megatron_adamoe.errors import OptionError, report

logger = logging.getLogger("megatron_adamoe.eval")
_METRICS = ("acc", "acc_norm", "bits_per_byte", "byte_perplexity", "word_perplexity")


def build_parser() -> argparse.ArgumentParser:
    from megatron_adamoe.hf.finetune_data import DEFAULT_MC_TEMPLATE

    parser = argparse.ArgumentParser(
        prog="adamoe-eval",
        description=__doc__.split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    add = parser.add_argument
    add("--model", required=True, help="an HF model directory (AdaMoE, Mixtral, a dense base)")
    add(
        "--adapter",
        default=None,
        help="adamoe-finetune's lora/qlora, mo-lora or ada-k output (adapters or allocators)",
    )
    add("--tasks", required=True, help="comma-separated NAME or NAME=FILE.jsonl")
    add("--include-path", default=None, help="a directory of lm-eval task YAMLs")
    add("--mc-template", default=DEFAULT_MC_TEMPLATE, help="as adamoe-finetune's")
    add(
        "--baseline-topk",
        type=int,
        default=None,
        help="k of the top-k baseline FLOPs are compared with (same true experts, no nulls; "
        "default: the model's k when it has no nulls)",
    )
    add(
        "--topk",
        type=int,
        default=None,
        help="route every token to this many picks instead of the model's num_experts_per_tok "
        "(e.g. a top-2 model evaluated as top-1)",
    )
    add("--num-fewshot", type=int, default=0)
    add("--limit", type=int, default=None, help="at most this many items per task")
    add("--output", default=None, help="the results as JSON (written whole or not at all)")
    return parser


def evaluate(options) -> dict:
    """{"tasks": {task: {acc, acc_stderr, acc_norm, acc_norm_stderr, load, load_mean,
    flops...}}, "overall": {...}} (overall: the mean over tasks)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    from megatron_adamoe.evaluation.flops import flops_report
    from megatron_adamoe.evaluation.load_meter import LoadMeter
    from megatron_adamoe.evaluation.tasks import parse_tasks, write_local_task

    tasks = parse_tasks(options.tasks)
    for name, least in (("baseline_topk", 1), ("topk", 1), ("num_fewshot", 0), ("limit", 1)):
        value = getattr(options, name)
        if value is not None and value < least:
            raise OptionError(
                f"{name} ({value}) must be >= {least}; fix --{name.replace('_', '-')}"
            )
    with tempfile.TemporaryDirectory() as local:
        for name, path in tasks:
            if path is not None:
                write_local_task(name, path, options.mc_template, local)
        manager = _task_manager([local, options.include_path], [name for name, _ in tasks])
        if _model_config(options.model).get("num_null_experts") and options.baseline_topk is None:
            raise OptionError(
                "baseline_topk must be given for a model with null experts (its k counts null "
                "picks); e.g. --baseline-topk 2 for a top-2 model converted to AdaMoE"
            )
        model, tokenizer = load_model(options.model, options.adapter, options.topk)
        if options.baseline_topk is None and _has_mo_lora_nulls(model):
            raise OptionError(
                "baseline_topk must be given for Mo-LoRA adapters with null experts (their k "
                "counts null picks); e.g. --baseline-topk 2 for plain top-2 MoLA"
            )
        results = {}
        with LoadMeter(model) as meter:
            lm = _lm(model, tokenizer)
            for name, _ in tasks:
                meter.reset()
                scores = _run_task(lm, name, manager, options)
                loads = meter.loads()
                results[name] = {
                    **scores,
                    "load": [round(x, 4) for x in loads],
                    "load_mean": sum(loads) / len(loads) if loads else None,
                    **flops_report(model, loads, options.baseline_topk, meter.module_loads()),
                }
                logger.info("%s: %s", name, _line(results[name]))
    overall = {
        key: sum(r[key] for r in results.values()) / len(results)
        for key in (
            "acc",
            "acc_norm",
            "bits_per_byte",
            "load_mean",
            "model_flops_pct",
            "expert_flops_pct",
        )
        if all(r.get(key) is not None for r in results.values())
    }
    return {"tasks": results, "overall": overall}


def _has_mo_lora_nulls(model) -> bool:
    from megatron_adamoe.adapters.mo_lora import MoLoRALinear

    return any(
        m.router.out_features > m.num_experts
        for m in model.modules()
        if isinstance(m, MoLoRALinear)
    )


def _model_config(model_dir: str) -> dict:
    path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(path):
        raise OptionError(f"model ({model_dir!r}) must be an HF model directory with config.json")
    with open(path) as handle:
        return json.load(handle)


def load_model(model_dir: str, adapter: Optional[str], topk: Optional[int] = None):
    """The model in fp32, eval mode, with its adapters: PEFT ones merged (merged = unmerged),
    Mo-LoRA ones wrapped (they cannot merge); ``topk`` overrides the config's picks per token."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import megatron_adamoe.hf  # noqa: F401  (registers the AdaMoE Auto classes)
    from megatron_adamoe.hf.versions import dtype_kwarg

    config = _model_config(model_dir)
    overrides = {}
    if topk is not None:
        if "num_experts_per_tok" not in config:
            raise OptionError(
                f"topk ({topk}) needs a model with routed experts; {model_dir} has no "
                "num_experts_per_tok: drop --topk"
            )
        true, null = config["num_local_experts"], config.get("num_null_experts", 0)
        if topk > true + null:
            raise OptionError(
                f"topk ({topk}) must be <= the model's {true + null} experts ({true} true + "
                f"{null} null); lower --topk"
            )
        overrides["num_experts_per_tok"] = topk
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, **{dtype_kwarg(): torch.float32}, **overrides
    )
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if adapter is not None:
        from megatron_adamoe.adak.model import CONFIG_FILE as ADAK_CONFIG
        from megatron_adamoe.adapters.mo_lora_state import CONFIG_FILE

        if os.path.isfile(os.path.join(adapter, ADAK_CONFIG)):
            from megatron_adamoe.adak import AdaK

            model.adak = AdaK.load(model, adapter)  # routes the blocks; argmax k
        elif os.path.isfile(os.path.join(adapter, CONFIG_FILE)):
            from megatron_adamoe.adapters import load_mo_lora

            model = load_mo_lora(model, adapter)
        else:
            from megatron_adamoe.adapters.peft_lora import load_lora

            model = load_lora(model, adapter).merge_and_unload()
    return model.eval(), tokenizer


def _lm(model, tokenizer):
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=1, device="cpu")


def _task_manager(include: list, names: list):
    """lm-eval's TaskManager over the local tasks and --include-path; every name known."""
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=[path for path in include if path])
    for name in names:
        if name not in manager.all_tasks:
            raise OptionError(
                f"tasks ({name!r}) is no task lm-eval knows here; give NAME=FILE.jsonl or a YAML "
                "in --include-path"
            )
    return manager


def _run_task(lm, name: str, manager, options) -> dict:
    from lm_eval import simple_evaluate

    output = simple_evaluate(
        model=lm,
        tasks=[name],
        task_manager=manager,
        num_fewshot=options.num_fewshot,
        limit=options.limit,
        log_samples=False,
        bootstrap_iters=1000,
    )
    found = output["results"][name]
    scores = {}
    for metric in _METRICS:
        if f"{metric},none" in found:
            scores[metric] = float(found[f"{metric},none"])
            stderr = found.get(f"{metric}_stderr,none")
            scores[f"{metric}_stderr"] = float(stderr) if isinstance(stderr, (int, float)) else None
    scores["samples"] = int(output.get("n-samples", {}).get(name, {}).get("effective", 0))
    return scores


def _line(result: dict) -> str:
    parts = [f"acc {result['acc']:.4f}" if "acc" in result else ""]
    if "bits_per_byte" in result:
        parts.append(f"bits/byte {result['bits_per_byte']:.4f}")
    if result.get("load_mean") is not None:
        parts.append(f"load {result['load_mean']:.3f}")
    if result.get("expert_flops_pct") is not None:
        parts.append(f"expert FLOPs {result['expert_flops_pct']:+.1f}%")
    parts.append(f"model FLOPs {result['model_flops_pct']:+.1f}%")
    return ", ".join(p for p in parts if p)


def table(results: dict) -> str:
    """The paper's layout: one column per task and the mean; rows Acc. (± stderr) and, for
    perplexity tasks, bits per byte; Load, %FLOPs (expert part, then the whole model)."""
    names = list(results["tasks"])
    rows = [["", *names, "mean"]]

    def cell(result, key, fmt):
        value = result.get(key)
        return "-" if value is None else fmt.format(value)

    def shown(key):
        return any(key in results["tasks"][n] for n in names)

    if shown("acc"):
        rows.append(
            ["Acc."]
            + [
                cell(results["tasks"][n], "acc", "{:.2%}")
                + (
                    f" ± {results['tasks'][n]['acc_stderr']:.2%}"
                    if results["tasks"][n].get("acc_stderr") is not None
                    else ""
                )
                for n in names
            ]
            + [cell(results["overall"], "acc", "{:.2%}")]
        )
    if shown("bits_per_byte"):
        rows.append(
            ["Bits/byte"]
            + [cell(results["tasks"][n], "bits_per_byte", "{:.4f}") for n in names]
            + [cell(results["overall"], "bits_per_byte", "{:.4f}")]
        )
    for label, key, fmt in (
        ("Load", "load_mean", "{:.2f}"),
        ("%FLOPs (experts)", "expert_flops_pct", "{:+.1f}%"),
        ("%FLOPs (model)", "model_flops_pct", "{:+.1f}%"),
    ):
        rows.append(
            [label]
            + [cell(results["tasks"][n], key, fmt) for n in names]
            + [cell(results["overall"], key, fmt)]
        )
    lines = ["| " + " | ".join(row) + " |" for row in rows]
    lines.insert(1, "|" + "---|" * len(rows[0]))
    return "\n".join(lines)


def _write_json(path: str, data: dict) -> None:
    """Written to a temporary name beside ``path``, then renamed: whole or not at all."""
    temporary = f"{path}.tmp-{os.getpid()}"
    try:
        with open(temporary, "w") as handle:
            json.dump(data, handle, indent=2)
        os.replace(temporary, path)
    except OSError as error:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise OptionError(
            f"output ({path!r}) cannot be written ({error.strerror}); pick a writable path"
        ) from None


def main(argv: Optional[list] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from megatron_adamoe.console import quiet_known_upstream_noise

    quiet_known_upstream_noise()
    try:
        options = build_parser().parse_args(argv)
        results = evaluate(options)
        if options.output:
            _write_json(options.output, results)
    except OptionError as error:
        return report(error)
    print(table(results))
    return 0


def console_main() -> None:
    sys.exit(main())


if __name__ == "__main__":
    sys.exit(main())
