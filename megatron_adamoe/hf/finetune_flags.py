"""adamoe-finetune's flags, and recipes: ``--config FILE.yaml`` sets any flag by its name
(``learning_rate: 5.0e-5``, ``lora_target_modules: [gate, w1, w2, w3]``); flags on the command
line override the file (configs/finetune/ holds the paper's two recipes and CPU twins)."""

from __future__ import annotations

import argparse
import os
from typing import Optional

from megatron_adamoe.adapters.mo_lora import DEFAULT_TARGETS
from megatron_adamoe.adapters.peft_lora import MOE_TARGETS
from megatron_adamoe.errors import OptionError
from megatron_adamoe.hf.finetune_data import DEFAULT_MC_TEMPLATE

METHODS = ("full", "lora", "qlora", "mo-lora", "ada-k")
# Set on the command line or in the recipe, one of the two (checked after parsing).
_REQUIRED = ("model", "data", "output_dir")


def build_parser(doc: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="adamoe-finetune",
        description=doc.split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=doc.split("\n\n", 1)[1],
    )
    add = parser.add_argument
    add("--config", default=None, help="a recipe: YAML of flag names and values (configs/finetune)")
    add(
        "--model",
        help="an AdaMoE HF directory (export-hf, mixtral-to-adamoe); a dense one for mo-lora",
    )
    add(
        "--method",
        choices=METHODS,
        default="full",
        help="full: every weight of an AdaMoE model; lora / qlora: PEFT LoRA adapters on an AdaMoE "
        "model (qlora: its base in 4 bits; paper section 4.2); mo-lora: AdaMoE LoRA experts on a "
        "frozen dense model (paper section 4.1); ada-k: Ada-K's per-token k allocators by PPO "
        "on a frozen AdaMoE or Mixtral model (docs/ada-k.md). Adapter methods write only the "
        "adapters, ada-k only the allocators",
    )
    add("--data", nargs="+", help=".jsonl or text files")
    add(
        "--data-format",
        choices=("auto", "text", "supervised"),
        default="auto",
        help="text: documents cut into blocks, every token in the loss; supervised: JSONL "
        "prompt/completion or question/choices/answer records, one example per row, the loss on "
        "the completion only; auto: supervised when the first record has prompt or question",
    )
    add("--json-key", default="text", help="text data: the JSONL key of each document")
    add(
        "--mc-template",
        default=DEFAULT_MC_TEMPLATE,
        help="multiple-choice records: the prompt ({question}, {choices} as lettered lines); "
        "the completion is ' ' + the answer choice's text (as lm-evaluation-harness scores it)",
    )
    add("--output-dir", help="where the fine-tuned model or the adapters are written (new)")
    add(
        "--checkpoint-dir",
        default=None,
        help="training checkpoints (default: <output-dir>-checkpoints)",
    )
    add("--save-steps", type=int, default=None, help="a checkpoint every N steps")
    add("--resume", action="store_true", help="continue from the latest checkpoint")
    add("--deepspeed", default=None, help="a DeepSpeed config (configs/deepspeed/zero{2,3}.json)")
    add("--seq-length", type=int, default=512)
    add("--per-device-batch-size", type=int, default=1)
    add("--gradient-accumulation-steps", type=int, default=1)
    add("--max-steps", type=int, default=100)
    add(
        "--num-epochs",
        type=int,
        default=None,
        help="train for this many passes over the data instead of --max-steps",
    )
    add("--learning-rate", type=float, default=1e-5)
    add("--warmup-steps", type=int, default=0)
    add("--weight-decay", type=float, default=0.0)
    add(
        "--aux-loss-coef",
        type=float,
        default=None,
        help="load-balancing coefficient per MoE layer (default: the model's; mo-lora: 0.001)",
    )
    add(
        "--aux-loss-coef-schedule",
        default=None,
        help="the coefficient over optimizer steps, in the pretraining options' grammar, e.g. "
        "'piecewise:0.01,STEPS_PER_EPOCH:0.001' (tight in epoch 1, loose in epoch 2: paper "
        "section 3.4; the run logs its steps per epoch)",
    )
    add(
        "--aux-loss-coef-per-epoch",
        type=float,
        nargs="+",
        default=None,
        help="one coefficient per epoch (with --num-epochs, as many values), e.g. 0.01 0.001: "
        "the paper's tight-then-loose schedule",
    )
    add(
        "--load-controller-rate",
        type=float,
        default=None,
        help="models with a null bias: unset, the bias solves for each step's target load; a "
        "number (expert override): its step per unit of load error",
    )
    add(
        "--gradient-checkpointing",
        action="store_true",
        help="recompute each decoder layer in the backward pass (less memory, more compute)",
    )
    add("--mo-lora-experts", type=int, default=4, help="mo-lora: n LoRA experts per linear")
    add("--mo-lora-null-experts", type=int, default=4, help="mo-lora: m null experts")
    add("--mo-lora-topk", type=int, default=2, help="mo-lora: k picks over n + m")
    add("--mo-lora-weight-norm", default="true_experts", help="mo-lora: weight normalisation")
    add("--adak-lambda", type=float, default=3e-3, help="ada-k: the compute penalty (paper Eq. 11)")
    add("--adak-max-k", type=int, default=None, help="ada-k: the largest k (default: every expert)")
    add("--ppo-epochs", type=int, default=2, help="ada-k: PPO updates per rollout")
    add("--ppo-clip", type=float, default=0.2, help="ada-k: PPO's clip epsilon")
    add("--ppo-gamma", type=float, default=1.0, help="ada-k: the discount over MoE layers")
    add("--lora-rank", type=int, default=8)
    add("--lora-alpha", type=float, default=16.0)
    add("--lora-dropout", type=float, default=0.05)
    add(
        "--lora-target-modules",
        nargs="+",
        default=None,
        help="the linears that get adapters, by name (default: mo-lora "
        f"{' '.join(DEFAULT_TARGETS)}; lora/qlora {' '.join(MOE_TARGETS)}, the router's "
        "n + m rows and the experts; add q_proj k_proj v_proj o_proj for attention)",
    )
    add("--logging-steps", type=int, default=10)
    add("--seed", type=int, default=1234)
    add("--bf16", action="store_true", help="bf16 (GPU)")
    add("--metrics-file", default=None, help="JSON lines, one per logging step (rank 0)")
    # The deepspeed launcher passes --local_rank=N (it also sets LOCAL_RANK, which is read).
    add("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return parser


def parse_flags(parser: argparse.ArgumentParser, argv: Optional[list] = None):
    """The flags, over the recipe of ``--config`` when given; the default target modules of
    the method filled in."""
    first = argparse.ArgumentParser(add_help=False)
    first.add_argument("--config", default=None)
    known, _ = first.parse_known_args(argv)
    if known.config is not None:
        parser.set_defaults(**read_recipe(known.config, parser))
    options = parser.parse_args(argv)
    missing = [name for name in _REQUIRED if getattr(options, name) is None]
    if missing:
        parser.error(
            "the following arguments are required (on the command line or in --config): "
            + ", ".join("--" + name.replace("_", "-") for name in missing)
        )
    if options.lora_target_modules is None:
        options.lora_target_modules = list(
            DEFAULT_TARGETS if options.method == "mo-lora" else MOE_TARGETS
        )
    return options


def read_recipe(path: str, parser: argparse.ArgumentParser) -> dict:
    """The recipe's values by flag destination, converted as the command line would convert
    them; unknown names, wrong types and bad choices are one line naming the file and key."""
    import yaml

    if not os.path.isfile(path):
        raise OptionError(
            f"config ({path!r}) must be an existing YAML recipe; see configs/finetune/"
        )
    try:
        with open(path) as handle:
            recipe = yaml.safe_load(handle) or {}
    except yaml.YAMLError as error:
        raise OptionError(f"config ({path!r}) must be valid YAML: {' '.join(str(error).split())}")
    if not isinstance(recipe, dict):
        raise OptionError(f"config ({path!r}) must be a mapping of flag names to values")
    actions = {a.dest: a for a in parser._actions if a.dest not in ("help", "config", "local_rank")}
    values = {}
    for key, value in recipe.items():
        name = str(key).replace("-", "_")
        if name not in actions:
            raise OptionError(
                f"config ({path!r}) key {key!r} is not a flag of adamoe-finetune; use the flags' "
                "names, e.g. learning_rate: 5.0e-5 (adamoe-finetune --help lists them)"
            )
        values[name] = _converted(actions[name], value, f"config ({path!r}) {key}")
    return values


def _converted(action: argparse.Action, value, where: str):
    many = action.nargs in ("+", "*")
    if value is None:
        return None
    if isinstance(action, argparse._StoreTrueAction):
        if not isinstance(value, bool):
            raise OptionError(f"{where} ({value!r}) must be true or false")
        return value
    items = value if isinstance(value, list) else [value]
    if not many and isinstance(value, list):
        raise OptionError(f"{where} ({value!r}) must be one value, not a list")
    convert = action.type or str
    try:
        items = [convert(str(item)) for item in items]
    except (TypeError, ValueError):
        kind = getattr(convert, "__name__", "value")
        raise OptionError(f"{where} ({value!r}) must be of type {kind}") from None
    for item in items:
        if action.choices is not None and item not in action.choices:
            raise OptionError(f"{where} ({item!r}) must be one of {', '.join(action.choices)}")
    return items if many else items[0]
