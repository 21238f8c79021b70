"""Reading runs back (metrics file, resumed runs, TensorBoard), the plots' data and images, the
study report's frontier arithmetic, and per-token compute maps against a per-token loop."""

from __future__ import annotations

import json
import math

import pytest
import torch

from megatron_adamoe.analysis import plots, report
from megatron_adamoe.analysis.compute_map import (
    compute,
    frequency_quartiles,
    summary,
    token_class,
    write,
)
from megatron_adamoe.analysis.runs import read_run
from megatron_adamoe.errors import OptionError


def _record(iteration, loss, loads, k_eff=None, step_time=0.5, flops=0.9):
    return {
        "iteration": iteration,
        "lm loss": loss,
        "load": loads,
        "step time": step_time,
        "flops vs topk": flops,
        "k_eff": k_eff or [[0.1, 0.4, 0.5]] * len(loads),
    }


def _write_run(directory, losses, loads, validation, k_eff=None):
    directory.mkdir(parents=True)
    with open(directory / "metrics.jsonl", "w") as handle:
        for i, loss in enumerate(losses, 1):
            handle.write(json.dumps(_record(i, loss, loads, k_eff)) + "\n")
        for iteration, loss in validation:
            handle.write(json.dumps({"iteration": iteration, "validation lm loss": loss}) + "\n")
    return directory


def test_metrics_file_of_a_resumed_run_keeps_the_last_attempt(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    lines = [
        _record(1, 5.0, [1.0]),
        _record(2, 4.0, [1.2]),
        _record(3, 9.0, [1.1]),
        {"iteration": 2, "validation lm loss": 4.5},
        _record(3, 3.5, [1.3]),
        _record(4, 3.0, [1.4]),
    ]  # attempt 2 from iteration 2
    (run_dir / "metrics.jsonl").write_text("\n".join(map(json.dumps, lines)) + "\n")
    run = read_run(str(run_dir))
    assert [(s.iteration, s.loss) for s in run.train] == [(1, 5.0), (2, 4.0), (3, 3.5), (4, 3.0)]
    assert run.validation == [(2, 4.5)]
    assert run.train[-1].mean_load == 1.4 and run.tail(0.5)[0].iteration == 3


def test_damaged_or_missing_runs_fail_with_one_line(tmp_path):
    with pytest.raises(OptionError, match=r"must hold metrics.jsonl or tensorboard/"):
        read_run(str(tmp_path))
    (tmp_path / "metrics.jsonl").write_text('{"iteration": 1, "lm loss": 2.0}\n{"iter')
    with pytest.raises(OptionError, match=r"metrics.jsonl:2 must be a JSON record"):
        read_run(str(tmp_path))


def test_tensorboard_events_read_like_the_metrics_file(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(tmp_path / "run" / "tensorboard"))
    for step in (1, 2, 3):
        writer.add_scalar("lm loss", 5.0 - step, step)
        writer.add_scalar("adamoe/flops_vs_topk", 0.8, step)
        for layer in (0, 1):
            writer.add_scalar(f"moe/adamoe/load_layer_{layer}", 1.0 + layer + step / 10, step)
            for j, value in enumerate((0.25, 0.5, 0.25)):
                writer.add_scalar(f"moe/adamoe/k_eff_{j}_fraction_layer_{layer}", value, step)
    writer.add_scalar("lm loss validation", 2.5, 3)
    writer.close()
    run = read_run(str(tmp_path / "run"))
    assert [s.loss for s in run.train] == [4.0, 3.0, 2.0]
    assert run.train[0].loads == pytest.approx([1.1, 2.1])
    assert run.train[2].k_eff == [[0.25, 0.5, 0.25]] * 2
    assert run.validation == [(3, 2.5)] and run.train[1].flops_vs_topk == pytest.approx(0.8)


def test_plot_data_mean_over_seeds_and_final_k_eff(tmp_path):
    runs = [
        read_run(
            str(
                _write_run(
                    tmp_path / f"a-seed{seed}",
                    [4.0, 3.0 + seed],
                    [1.0 + seed],
                    [(2, 3.0 + seed)],
                    [[0.2 * seed, 1 - 0.2 * seed]],
                )
            )
        )
        for seed in (1, 2)
    ]
    runs.append(read_run(str(_write_run(tmp_path / "b-seed1", [5.0, 4.0], [2.0], [(2, 2.0)]))))
    groups = plots.group_runs(runs)
    assert sorted(groups) == ["a", "b"] and len(groups["a"]) == 2
    steps, mean, low, high = plots._mean_band([{1: 4.0, 2: 4.0}, {1: 4.0, 2: 5.0}])
    assert (steps, mean, low, high) == ([1, 2], [4.0, 4.5], [4.0, 4.0], [4.0, 5.0])
    assert plots.final_k_eff(runs[1], fraction=0.5) == [[0.4, 0.6]]
    points = {p["name"]: p for p in plots.frontier_points(runs, baseline_topk=2)}
    assert points["a"]["x"] == [1.0, 1.5] and points["a"]["y"] == [4.0, 5.0]
    assert points["b"]["x"] == [1.0] and points["a"]["family"] == "runs"  # no saved options


def test_plot_all_writes_every_chart_as_a_readable_image(tmp_path):
    import matplotlib.image

    runs = [
        read_run(
            str(
                _write_run(
                    tmp_path / f"{name}-seed{seed}",
                    [5.0 - 0.01 * i for i in range(60)],
                    [1.0, 1.5],
                    [(30, 4.0 + seed / 10), (60, 3.5 + seed / 10)],
                )
            )
        )
        for name in ("top2", "adamoe")
        for seed in (1, 2)
    ]
    written = plots.plot_all(runs, str(tmp_path / "out"), baseline_topk=2)
    assert [p.rsplit("/", 1)[1] for p in written] == [
        "losses.png",
        "layer_load.png",
        "k_eff.png",
        "frontier.png",
    ]
    for path in written:
        image = matplotlib.image.imread(path)
        assert image.shape[0] > 300 and image.shape[1] > 500
        assert image[..., :3].std() > 0.05  # drawn on, not a blank canvas
    assert not list((tmp_path / "out").glob("*.tmp*"))


def _stats(loss, loss_std, flops, seeds=3):
    return {"final_val_loss": (loss, loss_std, seeds), "expert_flops_vs_baseline": (flops, 0, 3)}


def test_frontier_comparisons_interpolate_the_top_k_points():
    front = [
        ("top1", _stats(4.0, 0.03, 0.5)),
        ("top2", _stats(3.6, 0.03, 1.0)),
        ("top3", _stats(3.5, 0.03, 1.5)),
    ]
    at = report.compare_at_equal_flops(_stats(3.7, 0.0, 0.75), front)
    assert at["topk_loss"] == pytest.approx(3.8) and at["diff"] == pytest.approx(-0.1)
    assert at["stderr"] == pytest.approx(0.03 / math.sqrt(3)) and at["exceeds"]
    assert report.compare_at_equal_flops(_stats(3.7, 0.0, 0.25), front) is None
    # Within 1 % past an end (a measured 0.497 against top-1's 0.5): compared with that end.
    assert report.compare_at_equal_flops(_stats(4.1, 0.0, 0.497), front)["diff"] == pytest.approx(
        0.1
    )
    assert report.compare_at_equal_flops(_stats(4.1, 0.0, 0.49), front) is None
    how, saving = report.flops_at_equal_loss(_stats(3.6, 0, 0.75), front)
    assert how == "interpolated" and saving == pytest.approx(0.25)  # top-k needs 1.0
    how, saving = report.flops_at_equal_loss(_stats(3.4, 0, 0.75), front)
    assert how == "below every top-k arm's loss" and saving == pytest.approx(0.5)
    assert report.flops_at_equal_loss(_stats(4.2, 0, 0.75), front)[1] is None


def test_a_top_k_arm_that_spends_more_for_a_higher_loss_is_not_on_the_frontier():
    from types import SimpleNamespace

    stats = {
        "top4": {**_stats(4.8, 0.01, 0.5), "rows": [1]},
        "top6": {**_stats(4.7, 0.01, 0.75), "rows": [1]},
        "top8": {**_stats(5.0, 0.01, 1.0), "rows": [1]},
        "top12": {**_stats(4.6, 0.01, 1.5), "rows": [1]},
    }
    grid = SimpleNamespace(arms=list(stats), is_topk=lambda arm: True, group=lambda arm: "g")
    assert [arm for arm, _ in report.topk_arms(grid, stats, "g")] == list(stats)
    front = report.frontier(grid, stats, "g")
    assert [arm for arm, _ in front] == ["top4", "top6", "top12"]
    assert report.dominating(front, stats["top8"]) == "top6"


def test_wall_clock_gives_no_time_per_flops_ratio_for_another_expert_shape():
    """An arm of 16 experts of FFN 64 logs model FLOPs against top-2 of its own experts: its
    time is listed, but not divided by FLOPs of another baseline."""
    from types import SimpleNamespace

    def arm_stats(loss, flops, model_flops, tokens_per_s):
        return {**_stats(loss, 0.01, flops), "rows": [1], "tokens_per_s": (tokens_per_s, 0, 3),
                "model_flops_vs_baseline": (model_flops, 0, 3)}  # fmt: skip

    stats = {
        "top1": arm_stats(4.9, 0.5, 0.786, 1200.0),
        "top2": arm_stats(4.8, 1.0, 1.0, 1000.0),
        "fine": arm_stats(4.85, 0.75, 1.157, 800.0),
    }
    shapes = {"top1": (4, 256), "top2": (4, 256), "fine": (16, 64)}
    grid = SimpleNamespace(
        arms=list(stats),
        baseline_topk=2,
        is_topk=lambda arm: arm != "fine",
        group=lambda arm: "g",
        expert_shape=lambda arm: shapes[arm],
        baseline_shape=lambda: (4, 256),
    )
    lines = report._comparison_lines(grid, stats, "top2", stats["top2"]["tokens_per_s"])
    assert "- top1: time 0.833, model FLOPs 0.786, time/FLOPs 1.060" in lines
    assert "- fine: time 1.250, model FLOPs against top-2 of its own 16 experts of FFN 64" in lines


def test_token_classes_and_frequency_quartiles():
    assert [token_class(p) for p in ("\u2581the", "ing", ",", "\u2581.", "\u2581", "3")] == [
        "word-initial",
        "continuation",
        "punctuation",
        "punctuation",
        None,
        "continuation",
    ]
    # ids 7 (x4), 5 (x2), 9 (x1), 8 (x1): mid-ranks 6/8, 3/8, 1/8 of the 8 occurrences
    assert frequency_quartiles([7, 5, 7, 9, 7, 5, 8, 7]) == [3, 1, 3, 0, 3, 1, 0, 3]


@pytest.fixture(scope="module")
def tiny_model_and_tokenizer(tmp_path_factory):
    import sentencepiece as spm

    from megatron_adamoe.hf import AdaMoEForCausalLM, AdaMoEHFConfig, AdaMoETokenizer

    root = tmp_path_factory.mktemp("tok")
    text = (
        "To be, or not to be, that is the question: whether 'tis nobler in the mind "
        "to suffer the slings and arrows of outrageous fortune. "
    ) * 20
    (root / "corpus.txt").write_text(text)
    spm.SentencePieceTrainer.train(
        input=str(root / "corpus.txt"),
        model_prefix=str(root / "t"),
        vocab_size=60,
        model_type="bpe",
        minloglevel=2,
    )
    torch.manual_seed(0)
    config = AdaMoEHFConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=24,
        moe_intermediate_size=8,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_null_experts=4,
        num_experts_per_tok=3,
        max_position_embeddings=16,
        moe_layers=[0, 2],
    )
    model = AdaMoEForCausalLM(config)
    for param in model.parameters():
        torch.nn.init.normal_(param, std=0.5)
    return model, AdaMoETokenizer(str(root / "t.model")), text[:300]


def test_compute_map_counts_true_picks_like_a_per_token_loop(tiny_model_and_tokenizer, tmp_path):
    model, tokenizer, text = tiny_model_and_tokenizer
    cmap = compute(model, tokenizer, text)
    ids = tokenizer.sp_model.encode(text)
    assert cmap.token_ids == ids and cmap.moe_layers == [0, 2] and len(ids) > 16  # 2+ windows
    # Reference: the MoE blocks' inputs, window by window, routed token by token.
    gate_inputs = {0: [], 2: []}
    hooks = [
        model.model.layers[i].block_sparse_moe.register_forward_hook(
            lambda module, args, out, i=i: gate_inputs[i].append(args[0].detach())
        )
        for i in (0, 2)
    ]
    with torch.no_grad():
        for start in range(0, len(ids), 16):
            model(torch.tensor([ids[start : start + 16]]), use_cache=False)
    for hook in hooks:
        hook.remove()
    for row, layer in enumerate((0, 2)):
        gate = model.model.layers[layer].block_sparse_moe.gate.weight
        expected = []
        for x in torch.cat([g.reshape(-1, 16) for g in gate_inputs[layer]]):
            picks = torch.topk(torch.softmax(gate @ x, dim=-1), 3).indices
            expected.append(int((picks < 4).sum()))
        assert cmap.k_eff_LT[row].tolist() == expected
    assert 0 < cmap.mean_T.mean() < 3
    stats = write(cmap, str(tmp_path / "map"), "test", per_layer=True, max_shown=40)
    assert stats == summary(cmap)
    assert stats["by_layer"]["2"] == pytest.approx(cmap.k_eff_LT[1].float().mean().item())
    classes = stats["by_class"]
    assert sum(c["tokens"] for c in classes.values()) <= stats["tokens"]
    page = (tmp_path / "map" / "compute_map.html").read_text()
    assert page.count("<h3>") == 3 and "MoE layer 2" in page  # mean row + one per layer
    _check_html_and_css(page)
    assert json.loads((tmp_path / "map" / "summary.json").read_text()) == stats
    assert (tmp_path / "map" / "compute_map.png").stat().st_size > 1000


def test_compute_map_of_ada_k_counts_the_allocators_picks_like_a_per_token_loop(
    tiny_model_and_tokenizer,
):
    """With Ada-K allocators on the model, each token's k is its allocator's most likely count
    (argmax of its weights times the block input, plus one) and its true experts are the true
    ones among the router's top k over n + m."""
    from megatron_adamoe.adak import AdaK

    model, tokenizer, text = tiny_model_and_tokenizer
    model.adak = AdaK(model)
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for allocator in model.adak.allocators:
            allocator.proj.weight.copy_(
                torch.randn(allocator.proj.weight.shape, generator=generator)
            )
    allocators = [allocator.proj.weight.detach().clone() for allocator in model.adak.allocators]
    try:
        cmap = compute(model, tokenizer, text)
        ids = tokenizer.sp_model.encode(text)
        inputs = {0: [], 2: []}
        hooks = [
            model.model.layers[i].block_sparse_moe.register_forward_pre_hook(
                lambda module, args, i=i: inputs[i].append(args[0].detach())
            )
            for i in (0, 2)
        ]
        with torch.no_grad():
            for start in range(0, len(ids), 16):
                model(torch.tensor([ids[start : start + 16]]), use_cache=False)
        for hook in hooks:
            hook.remove()
    finally:
        model.adak.detach()
        del model.adak
    chosen = set()
    for row, layer in enumerate((0, 2)):
        gate = model.model.layers[layer].block_sparse_moe.gate.weight
        expected = []
        for x in torch.cat([g.reshape(-1, 16) for g in inputs[layer]]):
            k = int(torch.argmax(allocators[row] @ x)) + 1
            chosen.add(k)
            picks = torch.topk(torch.softmax(gate @ x, dim=-1), k).indices
            expected.append(int((picks < 4).sum()))
        assert cmap.k_eff_LT[row].tolist() == expected
    assert len(chosen) > 1  # the allocators vary k


def _check_html_and_css(page: str) -> None:
    """The page parses as HTML5 without a single parse error, and its style sheet and every
    inline style parse as CSS: the rules a browser applies are the ones written (a stray brace
    used to drop the passage's monospace/pre-wrap rule)."""
    import html5lib
    import tinycss2

    document = html5lib.HTMLParser(strict=True, namespaceHTMLElements=False).parse(page)
    (style,) = document.iter("style")
    rules = tinycss2.parse_stylesheet(style.text, skip_whitespace=True, skip_comments=True)
    assert [rule.type for rule in rules] == ["qualified-rule"] * 3
    declarations = {}
    for rule in rules:
        parsed = tinycss2.parse_blocks_contents(rule.content, skip_whitespace=True)
        assert all(d.type == "declaration" for d in parsed), tinycss2.serialize(rule.content)
        declarations[tinycss2.serialize(rule.prelude).strip()] = {
            d.lower_name: tinycss2.serialize(d.value).strip() for d in parsed
        }
    assert list(declarations) == ["body", ".text", "td,th"]
    assert declarations[".text"]["white-space"] == "pre-wrap"
    assert declarations[".text"]["font-family"] == "monospace"
    inline = [element.get("style") for element in document.iter() if element.get("style")]
    assert inline
    for css in inline:
        parsed = tinycss2.parse_blocks_contents(css, skip_whitespace=True)
        assert parsed and all(d.type == "declaration" for d in parsed), css


def test_a_grid_arm_that_breaks_the_pretraining_rules_is_refused_before_any_run(tmp_path):
    import yaml

    from megatron_adamoe.analysis.grid import load_grid
    from megatron_adamoe.errors import OptionError

    path = tmp_path / "grid.yaml"
    arms = {
        "ok": {"moe_router_topk": 2},
        "top1": {"moe_router_topk": 1, "adamoe_num_null_experts": 0},
    }
    grid = {"name": "x", "base_config": "configs/cpu_adamoe_tiny.yaml", "seeds": [1], "arms": arms}
    path.write_text(yaml.safe_dump(grid))
    with pytest.raises(OptionError) as error:
        load_grid(str(path))
    message = str(error.value)
    assert message.startswith("grid arm top1: adamoe_weight_norm ('true_experts') must be 'none'")
    assert message.endswith(f"; fix {path}") and "\n" not in message
    for shipped in ("cpu_shakespeare", "cpu_shakespeare_axes"):  # the shipped grids pass
        load_grid(f"configs/study/{shipped}.yaml")


@pytest.mark.parametrize(
    "args, message",
    [
        (["--max-tokens", "0"], "max_tokens (0) must be >= 1; pass a positive --max-tokens"),
        (
            ["--text", "/no/such.txt"],
            "text ('/no/such.txt') must be an existing file; check the path",
        ),
        (
            ["--adapter", "out/adak"],
            "adapter ('out/adak') applies to an exported model; pass --hf with it",
        ),
        (
            [],
            "model (--hf and --load) must be given by exactly one of them; pass an exported "
            "directory or a checkpoint",
        ),
        (
            ["--hf", "/no/such/export"],
            "hf ('/no/such/export') must be an exported AdaMoE model directory; run "
            "tools/convert_checkpoint.py export-hf",
        ),
    ],
)
def test_the_compute_map_tool_says_what_is_wrong_in_one_line(tmp_path, capsys, args, message):
    from tests.tools import load_tool

    tool = load_tool("compute_map")
    (tmp_path / "passage.txt").write_text("To be, or not to be.")
    base = ["--text", str(tmp_path / "passage.txt"), "--out", str(tmp_path / "map")]
    assert tool.main(base + args) == 2
    assert capsys.readouterr().err.strip() == f"error: {message}"
    assert not (tmp_path / "map").exists()  # nothing written


def test_wall_clock_is_measured_against_top_k_trained_as_the_base_config_trains():
    """The axes grid lists its expert-bias top-2 before the reused top-2 with the aux loss: the
    reference for time ratios is the latter (the base config's training), the other only when
    the grid has no such arm."""
    from megatron_adamoe.analysis.grid import load_grid

    grid = load_grid("configs/study/cpu_shakespeare_axes.yaml")
    stats = {
        arm: {"rows": [{"k": grid.options(arm).moe_router_topk}]}
        for arm in ("bias-top1", "bias-top2", "fg-top8", "top1", "top2", "top3")
    }
    assert list(stats).index("bias-top2") < list(stats).index("top2")
    assert report._arm_with_k(grid, stats, 2) == "top2"
    del stats["top2"]
    assert report._arm_with_k(grid, stats, 2) == "bias-top2"
    assert report._arm_with_k(grid, {"fg-top8": stats["fg-top8"]}, 8) is None  # another shape
