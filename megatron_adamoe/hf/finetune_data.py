"""adamoe-finetune's data: documents tokenized with the model's own tokenizer, cut into blocks."""

from __future__ import annotations

import torch

from megatron_adamoe.errors import OptionError


class BlockDataset(torch.utils.data.Dataset):
    """Token blocks of ``seq_length``: documents + EOS, concatenated, cut, shuffled once."""

    def __init__(self, documents, tokenizer, seq_length: int, seed: int) -> None:
        stream: list[int] = []
        for text in documents:
            stream += tokenizer(text, add_special_tokens=False)["input_ids"]
            if tokenizer.eos_token_id is not None:
                stream.append(tokenizer.eos_token_id)
        count = len(stream) // seq_length
        if count == 0:
            raise OptionError(
                f"data must hold at least seq_length ({seq_length}) tokens; it has "
                f"{len(stream)}: add text or lower --seq-length"
            )
        blocks = torch.tensor(stream[: count * seq_length]).view(count, seq_length)
        order = torch.randperm(count, generator=torch.Generator().manual_seed(seed))
        self.blocks = blocks[order]

    def __len__(self) -> int:
        return self.blocks.size(0)

    def __getitem__(self, index: int) -> dict:
        tokens = self.blocks[index]
        return {
            "input_ids": tokens,
            "labels": tokens.clone(),
            "attention_mask": torch.ones_like(tokens),
        }
