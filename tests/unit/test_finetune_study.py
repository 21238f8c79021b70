"""The fine-tuning protocol harness (tools/finetune_study.py): the steps it runs, in order, as
the commands a user types; resuming skips what exists; the table holds the mean and spread of
the runs' own eval.json numbers; --report-only rebuilds the same report from the kept files.
Each command is answered by a stand-in that writes what the real tool writes (the tools
themselves are tested in tests/convert and tests/unit/test_eval.py)."""

from __future__ import annotations

import json
import os
from statistics import fmean, pstdev

import pytest
import yaml

from megatron_adamoe.analysis import finetune_study
from megatron_adamoe.analysis.protocol import load_protocol
from megatron_adamoe.errors import OptionError

PROTOCOL = {
    "name": "tiny_table1",
    "pretrain": {"top2": {"grid": "configs/study/cpu_shakespeare.yaml", "arm": "top2", "seed": 1}},
    "bases": {"top2": {"from": "top2"}, "adamoe": {"from": "top2", "num_null_experts": 4}},
    "tasks": {"next_line": {"train": "train.jsonl", "eval": "shakespeare_next_line"}},
    "seeds": [1, 2],
    "common": {"num_epochs": 2, "aux_loss_coef_per_epoch": [0.01, 0.001]},
    "arms": {
        "top2-base": {"base": "top2", "method": "none"},
        "top2-lora": {"base": "top2", "method": "lora", "learning_rate": 1e-3},
        "adamoe-lora": {"base": "adamoe", "method": "lora", "learning_rate": 1e-3},
    },
}
ACC = {"top2-base": 0.30, "top2-lora": 0.40, "adamoe-lora": 0.45, "top1-base": 0.2}
BPB = {"top2-base": 2.0, "top2-lora": 1.9, "adamoe-lora": 1.95, "top1-base": 2.2}
MAP = {"adamoe-lora": 1.25, "top2-base": 2.0}


def _write(tmp_path, **changes) -> str:
    path = tmp_path / "protocol.yaml"
    path.write_text(yaml.safe_dump({**PROTOCOL, **changes}))
    return str(path)


class StandIn:
    """Writes each command's output as the real tool does; records the commands."""

    def __init__(self):
        self.commands = []

    def __call__(self, command, log, poll) -> int:
        self.commands.append(command)
        value = lambda flag: command[command.index(flag) + 1]  # noqa: E731
        if "megatron_adamoe.hf.finetune" in command:
            os.makedirs(value("--output-dir"))
            with open(value("--metrics-file"), "w") as handle:
                handle.write(json.dumps({"step": 10, "loss": 2.5 + int(value("--seed"))}) + "\n")
        elif "megatron_adamoe.evaluation.cli" in command:
            run = os.path.basename(os.path.dirname(value("--output")))
            arm, seed = run.rsplit("-next_line-seed", 1)
            acc = ACC[arm] + 0.01 * int(seed)
            result = {"acc": acc, "load_mean": 1.4 if "adamoe" in arm else 2.0,
                      "model_flops_pct": -8.0 if "adamoe" in arm else 0.0}  # fmt: skip
            task = value("--tasks")
            if task == "shakespeare_validation":
                top1 = "--topk=1" in command
                result = {
                    "bits_per_byte": BPB[arm] + 0.01 * int(seed),
                    "load_mean": 1.0 if top1 else result["load_mean"],
                    "model_flops_pct": -25.0 if top1 else result["model_flops_pct"],
                }
            with open(value("--output"), "w") as handle:
                json.dump({"tasks": {task: result}, "overall": result}, handle)
        elif command[1].endswith("tools/compute_map.py"):
            os.makedirs(value("--out"))
            arm = os.path.basename(os.path.dirname(value("--out"))).split("-next_line")[0]
            summary = {
                "mean_k_eff": MAP[arm],
                "by_layer": {"0": MAP[arm] + 0.5, "1": 0.5},
                "by_class": {"punctuation": {"tokens": 3, "mean_k_eff": 1.0}},
                "by_frequency": {"Q1 rarest": {"tokens": 0, "mean_k_eff": None}},
            }
            for name, text in (("summary.json", json.dumps(summary)), ("compute_map.png", "png")):
                with open(os.path.join(value("--out"), name), "w") as handle:
                    handle.write(text)
        else:  # tools/convert_checkpoint.py
            os.makedirs(value("--out"))
        return 0


def test_protocol_runs_every_step_resumes_and_reports(tmp_path, monkeypatch):
    monkeypatch.setattr(finetune_study.study, "_git_commit", lambda: "abc1234")  # no git,
    monkeypatch.setattr(finetune_study.study, "machine", lambda: {"cores": 2})  # no uname here
    protocol = load_protocol(_write(tmp_path))
    runs, out = tmp_path / "runs", tmp_path / "out"
    (runs / "tiny_table1" / "pretrain" / "top2").mkdir(parents=True)  # pretrained already
    (runs / "tiny_table1" / "pretrain" / "top2" / "done.json").write_text("{}")
    stand_in = StandIn()
    finetune_study.run_protocol(protocol, str(runs), str(out), progress=False, launch=stand_in)
    kinds = [" ".join(c[1:4]) for c in stand_in.commands]
    assert sum("export-hf" in k for k in kinds) == 2 and sum("add-null" in k for k in kinds) == 1
    fine_tunes = [c for c in stand_in.commands if "megatron_adamoe.hf.finetune" in c]
    assert len(fine_tunes) == 4  # two LoRA arms x two seeds; the base arm is scored as it is
    assert all("--aux-loss-coef-per-epoch" in c and "--num-epochs=2" in c for c in fine_tunes)
    evals = [c for c in stand_in.commands if "megatron_adamoe.evaluation.cli" in c]
    assert len(evals) == 5
    lora_eval = next(c for c in evals if "adamoe-lora-next_line-seed1" in " ".join(c))
    assert lora_eval[lora_eval.index("--model") + 1].endswith("bases/adamoe")
    assert lora_eval[lora_eval.index("--adapter") + 1].endswith("adamoe-lora-next_line-seed1/model")

    # A second run finds everything done and starts nothing.
    again = StandIn()
    finetune_study.run_protocol(protocol, str(runs), str(out), progress=False, launch=again)
    assert again.commands == []

    readme = (out / "tiny_table1" / "README.md").read_text()
    values = [100 * (ACC["adamoe-lora"] + 0.01 * seed) for seed in (1, 2)]
    expected = f"{fmean(values):.1f} ± {pstdev(values):.1f} (2)"
    row = next(line for line in readme.splitlines() if line.startswith("| adamoe-lora |"))
    assert row.split(" | ")[1:4] == [expected, "1.40", "-8.0"]
    assert (out / "tiny_table1" / "accuracy_flops.png").stat().st_size > 0

    # --report-only from the kept files alone (the work directory gone): the same report.
    import shutil

    shutil.rmtree(runs)
    os.remove(out / "tiny_table1" / "README.md")
    finetune_study.write_report(protocol, str(out))
    rebuilt = (out / "tiny_table1" / "README.md").read_text()
    assert rebuilt.split("Machine:")[0] == readme.split("Machine:")[0]


def test_a_validation_text_added_later_scores_every_run_and_nothing_else(tmp_path, monkeypatch):
    """A finished protocol given `validation`, `compute_maps` and a top-1 arm (the base with
    --topk 1) runs only what is missing: the new arm's task scores, every run's validation score
    and the mapped arms' maps of their seed; the runs keep their own wall times; the report gains
    the validation table (mean ± std over runs) and the compute-map table."""
    monkeypatch.setattr(finetune_study.study, "_git_commit", lambda: "abc1234")
    monkeypatch.setattr(finetune_study.study, "machine", lambda: {"cores": 2})
    runs, out = tmp_path / "runs", tmp_path / "out"
    (runs / "tiny_table1" / "pretrain" / "top2").mkdir(parents=True)
    (runs / "tiny_table1" / "pretrain" / "top2" / "done.json").write_text("{}")
    before = load_protocol(_write(tmp_path))
    finetune_study.run_protocol(before, str(runs), str(out), progress=False, launch=StandIn())
    kept = out / "tiny_table1" / "runs" / "top2-lora-next_line-seed1" / "done.json"
    wall = json.loads(kept.read_text())["wall_s"]

    arms = {**PROTOCOL["arms"], "top1-base": {"base": "top2", "method": "none", "topk": 1}}
    maps = {"text": "val.txt", "seed": 2, "arms": ["adamoe-lora", "top2-base"]}
    after = load_protocol(
        _write(
            tmp_path,
            validation="shakespeare_validation",
            arms=arms,
            compute_maps=maps,
            validation_frontier=["top1-base", "top2-base"],
        )
    )
    stand_in = StandIn()
    finetune_study.run_protocol(after, str(runs), str(out), progress=False, launch=stand_in)
    assert not [c for c in stand_in.commands if "megatron_adamoe.hf.finetune" in c]
    tasks = [c[c.index("--tasks") + 1] for c in stand_in.commands if "--tasks" in c]
    assert tasks.count("shakespeare_validation") == 6 and tasks.count("shakespeare_next_line") == 1
    mapped = [c for c in stand_in.commands if c[1].endswith("compute_map.py")]
    assert [c[c.index("--out") + 1].split("/")[-2] for c in mapped] == [
        "top2-base-next_line-seed0",
        "adamoe-lora-next_line-seed2",
    ]
    lora_map = mapped[1]
    assert lora_map[lora_map.index("--hf") + 1].endswith("bases/adamoe")
    assert lora_map[lora_map.index("--adapter") + 1].endswith("adamoe-lora-next_line-seed2/model")
    top1 = [c for c in stand_in.commands if "top1-base-next_line-seed0" in " ".join(c)]
    assert len(top1) == 2 and all("--topk=1" in c for c in top1)
    assert all("--topk=1" not in c for c in stand_in.commands if c not in top1)
    done = json.loads(kept.read_text())
    assert done["wall_s"] == wall and done["validation_wall_s"] >= 0

    readme = (out / "tiny_table1" / "README.md").read_text()
    values = [BPB["adamoe-lora"] + 0.01 * seed for seed in (1, 2)]
    row = next(line for line in readme.splitlines() if line.startswith("| adamoe-lora | 1."))
    assert row == f"| adamoe-lora | {fmean(values):.4f} ± {pstdev(values):.4f} (2) | 1.40 | -8.0 |"
    assert "| top1-base | 2.2000 ± 0.0000 (1) | 1.00 | -25.0 |" in readme
    # The frontier: (-25 %, 2.20) to (0 %, 2.00); adamoe-lora at -8 % lies on it at 2.064.
    gaps = [value - (2.2 - 0.2 * 17 / 25) for value in values]
    assert f"| adamoe-lora | -8.0 | {fmean(gaps):+.4f} ± {pstdev(gaps):.4f} | 2/2 |" in readme
    assert "| top2-lora | +0.0 | -0.0850 ± 0.0050 | 2/2 |" in readme
    assert (out / "tiny_table1" / "validation_flops.png").stat().st_size > 0
    assert "| adamoe-lora | 1 | 1.25 | 1.75 | 0.50 | 1.00 | - |" in readme
    assert "| top2-base | 1 | 2.00 | 2.50 | 0.50 | 1.00 | - |" in readme
    kept_map = out / "tiny_table1" / "runs" / "adamoe-lora-next_line-seed2" / "compute_map"
    assert sorted(p.name for p in kept_map.iterdir()) == ["compute_map.png", "summary.json"]
    with open(out / "tiny_table1" / "results.csv") as handle:
        header = handle.readline().strip().split(",")
    assert header[-3:] == ["val_bits_per_byte", "val_load_mean", "val_model_flops_pct"]


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"arms": {"a": {"base": "no", "method": "lora"}}}, "arms.a.base ('no') must be one of"),
        ({"common": {"output_dir": "x"}}, "protocol common options (output_dir) must be"),
        ({"common": {"not_a_flag": 1}}, "protocol common options (not_a_flag) must be"),
        ({"bases": {"top2": {"tile": 1}}}, "bases.top2 keys (tile) must be among"),
        ({"bases": {"top2": {"from": "x"}}}, "bases.top2.from ('x') must be one of the"),
        ({"pretrain": {"b": {"grid": "configs/study/cpu_shakespeare.yaml", "arm": "top9",
                             "seed": 1}}}, "pretrain.b.arm ('top9') must be an arm of"),
        ({"pretrain": {"b": {"arm": "top2"}}}, "pretrain.b ({'arm': 'top2'}) must name grid"),
        ({"tasks": {"t": {"train": "x.jsonl"}}}, "tasks.t must name train (JSONL) and eval"),
        ({"colour": "blue"}, "protocol keys (colour) must be among"),
        ({"compute_maps": {"text": "t", "seed": 1}}, "compute_maps keys (seed, text) must be"),
        ({"validation_frontier": ["a", "b"]}, "validation_frontier needs a validation task"),
        ({"validation": "v", "validation_frontier": ["top2-base", "top2-lora"]},
         "validation_frontier (['top2-base', 'top2-lora']) must name two or more method: none"),
        ({"compute_maps": {"text": "t", "seed": 7, "arms": []}},
         "compute_maps.seed (7) must be one of the seeds"),
        ({"compute_maps": {"text": "t", "seed": 1, "arms": ["x"]}},
         "compute_maps.arms ('x') must name arms of MoE models routed as exported"),
        ({"arms": {"a": {"base": "top2", "method": "lora", "topk": 1}}},
         "arms.a.topk (1) is for method: none arms (the base scored with another k); a "
         "fine-tuned arm keeps its base's k: drop topk"),
    ],
)  # fmt: skip
def test_a_bad_protocol_is_one_line_naming_the_field(tmp_path, changes, message):
    with pytest.raises(OptionError) as error:
        load_protocol(_write(tmp_path, **changes))
    assert str(error.value).startswith(message) and "\n" not in str(error.value)


def test_the_shipped_protocol_loads():
    protocol = load_protocol("configs/study/cpu_table1.yaml")
    assert len(protocol.runs()) == 2 * (3 + 8 * 3)  # two tasks; three base arms scored once
    assert protocol.validation == "shakespeare_validation"
    dense = protocol.pretrain["dense"]["overrides"]
    assert dense["num_experts"] == 0  # the dense twin of the top-2 base, for Mo-LoRA
