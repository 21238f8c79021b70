#!/usr/bin/env python3
"""Per-token compute map of a trained AdaMoE model over a text: an HTML page (tokens coloured by
the number of true experts they used), a PNG heat map, and mean k_eff by token class and layer.

    python tools/compute_map.py --hf runs/cpu_adamoe_tiny/hf --text passage.txt --out map/
    python tools/compute_map.py --load runs/cpu_adamoe_tiny/checkpoints --text passage.txt \\
        --out map/ --per-layer
    python tools/compute_map.py --hf hf/top2 --adapter out/adak --text passage.txt --out map/

--adapter takes adamoe-finetune's output on that export, as adamoe-eval does: Ada-K allocators
(each token's k is theirs) or PEFT LoRA adapters (merged).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_adamoe.errors import OptionError, report  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--hf", help="an exported AdaMoE model directory")
    parser.add_argument("--load", help="a Megatron checkpoint (save directory or iter_N)")
    parser.add_argument("--adapter", help="Ada-K allocators or LoRA adapters of the --hf model")
    parser.add_argument("--text", required=True, help="a UTF-8 text file")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--per-layer", action="store_true", help="one text row per MoE layer")
    parser.add_argument(
        "--max-tokens", type=int, default=None, help="route only the first N tokens of the text"
    )
    parser.add_argument(
        "--show-tokens",
        type=int,
        default=1500,
        help="tokens shown in the HTML page (statistics use all)",
    )
    parser.add_argument("--title", default=None)
    options = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from megatron_adamoe.analysis import compute_map

    try:
        for name in ("max_tokens", "show_tokens"):
            value = getattr(options, name)
            if value is not None and value < 1:
                raise OptionError(
                    f"{name} ({value}) must be >= 1; pass a positive --{name.replace('_', '-')}"
                )
        if not os.path.isfile(options.text):
            raise OptionError(f"text ({options.text!r}) must be an existing file; check the path")
        with open(options.text, encoding="utf-8") as handle:
            text = handle.read()
        if options.adapter and not options.hf:
            raise OptionError(
                f"adapter ({options.adapter!r}) applies to an exported model; pass --hf with it"
            )
        if options.adapter:
            from megatron_adamoe.evaluation.cli import load_model

            model, tokenizer = load_model(options.hf, options.adapter)
        else:
            model, tokenizer = compute_map.load_model(options.hf, options.load)
        cmap = compute_map.compute(model, tokenizer, text, options.max_tokens)
        title = options.title or f"Compute map: {os.path.basename(options.text)}"
        stats = compute_map.write(cmap, options.out, title, options.per_layer, options.show_tokens)
    except OptionError as error:
        return report(error)
    print(json.dumps(stats, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
