"""Per-token compute maps: how many true experts (k_eff) each token of a text uses, per layer.

The model runs as its Hugging Face export (``AdaMoEForCausalLM``; a Megatron checkpoint is exported
to a temporary directory first), whose routing equals Megatron's (tests/unit/test_hf_model.py).
The text is cut into windows of the model's context length; every token is routed as the model
routes it (top-k or top-p over true + null experts, with its selection biases).

Outputs: ``compute_map.html`` (tokens coloured by mean k_eff over the MoE layers, optionally a row
per layer, per-layer values in each token's tooltip), ``compute_map.png`` (a layers x tokens heat
map of the first tokens), ``summary.json`` and a table of mean k_eff by token class and by layer.

Token classes (sentencepiece pieces, "▁" marks a word start): punctuation (no letter or digit),
word-initial (starts a word), continuation (inside a word); and frequency quartiles: each token
occurrence placed by how often its id occurs in this text (Q1 rarest .. Q4 most frequent).
"""

from __future__ import annotations

import html
import json
import os
import tempfile
from dataclasses import dataclass
from statistics import fmean
from typing import Optional

import torch

from megatron_adamoe.errors import OptionError

WORD_START = "\u2581"
CLASSES = ("punctuation", "word-initial", "continuation")
QUARTILES = ("Q1 rarest", "Q2", "Q3", "Q4 most frequent")


@dataclass
class ComputeMap:
    pieces: list[str]  # [T]
    token_ids: list[int]  # [T]
    k_eff_LT: torch.Tensor  # [MoE layers, T] true experts used
    moe_layers: list[int]
    topk: int

    @property
    def mean_T(self) -> torch.Tensor:
        return self.k_eff_LT.float().mean(dim=0)


def token_class(piece: str) -> Optional[str]:
    body = piece[1:] if piece.startswith(WORD_START) else piece
    if not body:
        return None  # a bare word-start marker
    if not any(ch.isalnum() for ch in body):
        return "punctuation"
    return "word-initial" if piece.startswith(WORD_START) else "continuation"


def frequency_quartiles(token_ids: list[int]) -> list[int]:
    """Per occurrence, 0..3: the quartile of its id's count in the text (0 = rarest), placed by
    the mid-rank of that count among all occurrences, so an id's occurrences share a quartile."""
    counts: dict[int, int] = {}
    for token in token_ids:
        counts[token] = counts.get(token, 0) + 1
    per_count: dict[int, int] = {}  # occurrences whose id has this count
    for token in token_ids:
        per_count[counts[token]] = per_count.get(counts[token], 0) + 1
    quartile_of_count, below = {}, 0
    for count in sorted(per_count):
        middle = (below + per_count[count] / 2) / len(token_ids)
        quartile_of_count[count] = min(3, int(4 * middle))
        below += per_count[count]
    return [quartile_of_count[counts[token]] for token in token_ids]


def compute(model, tokenizer, text: str, max_tokens: Optional[int] = None) -> ComputeMap:
    """Route every token of ``text`` through ``model`` (an ``AdaMoEForCausalLM``; with Ada-K
    allocators attached as ``model.adak``, each token's k is theirs and its true experts are
    what that routing used)."""
    config = model.config
    token_ids = tokenizer.sp_model.encode(text)
    if max_tokens:
        token_ids = token_ids[:max_tokens]
    if not token_ids:
        raise OptionError("text must hold at least one token; pass a non-empty --text file")
    window = config.max_position_embeddings
    per_layer: list[list[torch.Tensor]] = [[] for _ in config.moe_layers]
    blocks = [layer.block_sparse_moe for layer in model.model.layers if layer.is_moe]
    adak = getattr(model, "adak", None)
    model.eval()
    with torch.no_grad():
        for start in range(0, len(token_ids), window):
            chunk = torch.tensor([token_ids[start : start + window]])
            out = model.model(input_ids=chunk, use_cache=False, output_router_logits=True)
            for layer, (block, logits_TX) in enumerate(zip(blocks, out.router_logits)):
                if adak is not None:  # the allocators' k, recorded by their routed forward
                    per_layer[layer].append(adak.steps[layer].true_experts_T)
                    continue
                picked_TE = block.route(logits_TX).routing_map_TE  # the block's own routing
                per_layer[layer].append(picked_TE.sum(dim=-1))
    k_eff_LT = torch.stack([torch.cat(chunks) for chunks in per_layer])
    pieces = [tokenizer.sp_model.id_to_piece(t) for t in token_ids]
    return ComputeMap(
        pieces, token_ids, k_eff_LT, list(config.moe_layers), config.num_experts_per_tok
    )


def summary(cmap: ComputeMap) -> dict:
    """Mean k_eff overall, by token class, by frequency quartile and by MoE layer."""
    mean_T = cmap.mean_T.tolist()
    classes = [token_class(p) for p in cmap.pieces]
    quartiles = frequency_quartiles(cmap.token_ids)

    def mean_where(mask: list[bool]) -> dict:
        values = [v for v, keep in zip(mean_T, mask) if keep]
        return {"tokens": len(values), "mean_k_eff": fmean(values) if values else None}

    return {
        "tokens": len(mean_T),
        "topk": cmap.topk,
        "mean_k_eff": fmean(mean_T),
        "by_class": {name: mean_where([c == name for c in classes]) for name in CLASSES},
        "by_frequency": {
            name: mean_where([q == i for q in quartiles]) for i, name in enumerate(QUARTILES)
        },
        "by_layer": {
            str(layer): float(cmap.k_eff_LT[i].float().mean())
            for i, layer in enumerate(cmap.moe_layers)
        },
    }


def _color(value: float, topk: int) -> str:
    """White (0 true experts) to dark blue (k)."""
    share = max(0.0, min(1.0, value / max(1, topk)))
    red, green, blue = (int(255 - share * (255 - c)) for c in (8, 48, 140))
    return f"rgb({red},{green},{blue})"


PAGE_CSS = (
    "body{font-family:sans-serif;max-width:70em;margin:2em auto} "
    ".text{font-family:monospace;line-height:1.9;white-space:pre-wrap} "
    "td,th{padding:2px 10px;text-align:left}"
)


def _display(piece: str) -> str:
    return html.escape(piece.replace(WORD_START, " "))


def render_html(cmap: ComputeMap, stats: dict, title: str, per_layer: bool, max_shown: int) -> str:
    shown = min(len(cmap.pieces), max_shown)
    mean_T = cmap.mean_T.tolist()

    def row(values: list[float], label: str) -> str:
        spans = []
        for t in range(shown):
            dark = values[t] > 0.6 * cmap.topk
            tip = ", ".join(
                f"L{layer}: {int(cmap.k_eff_LT[i, t])}" for i, layer in enumerate(cmap.moe_layers)
            )
            spans.append(
                f'<span style="background:{_color(values[t], cmap.topk)};'
                f'{"color:white;" if dark else ""}" title="{tip}">'
                f"{_display(cmap.pieces[t])}</span>"
            )
        return f'<h3>{html.escape(label)}</h3><p class="text">{"".join(spans)}</p>'

    rows = [row(mean_T, f"mean over {len(cmap.moe_layers)} MoE layers")]
    if per_layer:
        rows += [
            row(cmap.k_eff_LT[i].float().tolist(), f"MoE layer {layer}")
            for i, layer in enumerate(cmap.moe_layers)
        ]
    legend = "".join(
        f'<span style="background:{_color(j, cmap.topk)};'
        f'{"color:white;" if j > 0.6 * cmap.topk else ""}">&nbsp;{j}&nbsp;</span>'
        for j in range(cmap.topk + 1)
    )
    table = ["<table><tr><th>tokens</th><th>count</th><th>mean k_eff</th></tr>"]
    for group in ("by_class", "by_frequency"):
        for name, cell in stats[group].items():
            value = "-" if cell["mean_k_eff"] is None else f"{cell['mean_k_eff']:.3f}"
            table.append(f"<tr><td>{name}</td><td>{cell['tokens']}</td><td>{value}</td></tr>")
    for layer, value in stats["by_layer"].items():
        table.append(
            f"<tr><td>MoE layer {layer}</td><td>{stats['tokens']}</td><td>{value:.3f}</td></tr>"
        )
    table.append(
        f"<tr><td><b>all</b></td><td>{stats['tokens']}</td>"
        f"<td><b>{stats['mean_k_eff']:.3f}</b></td></tr></table>"
    )
    return (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title><style>{PAGE_CSS}</style></head><body>"
        f"<h1>{html.escape(title)}</h1><p>Each token coloured by the number of true experts it "
        f"used (k_eff, 0..{cmap.topk}); hover for the per-layer values. Legend: {legend}. "
        f"Showing {shown} of {len(cmap.pieces)} tokens; the table covers all of them.</p>"
        + "".join(rows)
        + "<h2>Mean k_eff by token class, frequency and layer</h2>"
        + "".join(table)
        + "</body></html>"
    )


def render_png(cmap: ComputeMap, path: str, max_shown: int = 80) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = min(len(cmap.pieces), max_shown)
    grid = torch.cat([cmap.k_eff_LT[:, :shown].float(), cmap.mean_T[None, :shown]]).numpy()
    figure, axis = plt.subplots(figsize=(max(8, shown * 0.18), 1.2 + 0.45 * grid.shape[0]))
    image = axis.imshow(grid, cmap="Blues", vmin=0, vmax=cmap.topk, aspect="auto")
    axis.set_yticks(
        range(grid.shape[0]), [f"layer {layer}" for layer in cmap.moe_layers] + ["mean"]
    )
    axis.set_xticks(
        range(shown),
        [p.replace(WORD_START, "_") for p in cmap.pieces[:shown]],
        rotation=90,
        fontsize=7,
    )
    figure.colorbar(image, ax=axis, label="true experts (k_eff)", fraction=0.02)
    axis.set_title("true experts per token and layer")
    figure.tight_layout()
    figure.savefig(path + ".tmp.png", dpi=110)
    plt.close(figure)
    os.replace(path + ".tmp.png", path)


def load_model(hf_dir: Optional[str], load: Optional[str]):
    """(model, tokenizer) from an HF export, or from a Megatron checkpoint exported on the fly
    (to a temporary directory, removed once loaded)."""
    if (hf_dir is None) == (load is None):
        raise OptionError(
            "model (--hf and --load) must be given by exactly one of them; pass "
            "an exported directory or a checkpoint"
        )
    if load is None:
        return _load_export(hf_dir)
    from megatron_adamoe.hf.export import export_hf

    with tempfile.TemporaryDirectory(prefix="adamoe-compute-map-") as scratch:
        return _load_export(export_hf(load, os.path.join(scratch, "hf")))


def _load_export(hf_dir: str):
    from megatron_adamoe.hf import AdaMoEForCausalLM, AdaMoETokenizer

    if not os.path.isfile(os.path.join(hf_dir, "config.json")):
        raise OptionError(
            f"hf ({hf_dir!r}) must be an exported AdaMoE model directory; run "
            "tools/convert_checkpoint.py export-hf"
        )
    # (on Linux a removed file stays readable while it is mapped)
    model = AdaMoEForCausalLM.from_pretrained(hf_dir).float()
    return model, AdaMoETokenizer.from_pretrained(hf_dir)


def write(
    cmap: ComputeMap, out_dir: str, title: str, per_layer: bool = False, max_shown: int = 1500
) -> dict:
    os.makedirs(out_dir, exist_ok=True)
    stats = summary(cmap)
    for name, text in (
        ("compute_map.html", render_html(cmap, stats, title, per_layer, max_shown)),
        ("summary.json", json.dumps(stats, indent=1)),
    ):
        path = os.path.join(out_dir, name)
        with open(path + ".tmp", "w") as handle:
            handle.write(text)
        os.replace(path + ".tmp", path)
    render_png(cmap, os.path.join(out_dir, "compute_map.png"))
    return stats
