"""Train/validation data: Megatron's BlendedMegatronDatasetBuilder + GPTDataset over indexed data.

The training position is the number of consumed samples: batch ``i`` always holds the same global
samples, so a resumed run reads exactly what an uninterrupted run would. Each data-parallel rank
takes its micro-batch slice of every global batch (Megatron's pretraining sampler order). The
validation set is the first ``eval_iters`` global batches of the validation split, evaluated in
full each time, so validation losses are comparable across runs and parallel layouts.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
from megatron.core.datasets.utils import get_blend_from_list

from megatron_adamoe.options import PretrainArguments

BATCH_KEYS = ("tokens", "labels", "loss_mask", "attention_mask", "position_ids")


def build_datasets(args: PretrainArguments, tokenizer):
    """(train, valid) GPTDatasets; rank 0 builds the index caches first, then every rank loads."""
    config = GPTDatasetConfig(
        random_seed=args.seed if args.adamoe_data_seed is None else args.adamoe_data_seed,
        sequence_length=args.seq_length,
        blend=get_blend_from_list([str(p) for p in args.data_path]),
        split=args.split,
        path_to_cache=args.data_cache_path,
        tokenizer=tokenizer,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=True,
        mid_level_dataset_surplus=0.005,
    )
    sizes = [args.train_iters * args.global_batch_size, _num_valid_samples(args), 0]
    datasets = None
    for building_rank in (True, False):
        if (dist.get_rank() == 0) == building_rank:
            datasets = BlendedMegatronDatasetBuilder(
                GPTDataset, sizes, lambda: True, config
            ).build()
        dist.barrier()
    train, valid, _ = datasets
    return train, valid


def _num_valid_samples(args: PretrainArguments) -> int:
    return args.eval_iters * args.global_batch_size if args.eval_interval else 0


def _collate(samples: list[dict]) -> dict[str, torch.Tensor]:
    batch = {}
    for key in BATCH_KEYS:
        values = [torch.as_tensor(np.asarray(sample[key])) for sample in samples]
        batch[key] = torch.stack(values)
    return batch


def microbatch_iterator(
    dataset, args: PretrainArguments, first_sample: int, num_batches: int, device
):
    """Yield this data-parallel rank's micro-batches (on ``device``) of ``num_batches`` batches.

    Global batch ``b`` covers samples ``first_sample + b * global_batch_size`` onwards; within it,
    micro-batch ``j`` of data-parallel rank ``r`` is samples
    ``[(j * dp + r) * micro_batch_size, ... + micro_batch_size)``.
    """
    dp_rank = parallel_state.get_data_parallel_rank()
    dp_size = parallel_state.get_data_parallel_world_size()
    mbs = args.micro_batch_size
    for batch in range(num_batches):
        start = first_sample + batch * args.global_batch_size
        for micro in range(args.num_microbatches):
            offset = start + (micro * dp_size + dp_rank) * mbs
            samples = [dataset[index] for index in range(offset, offset + mbs)]
            yield {k: v.to(device, non_blocking=True) for k, v in _collate(samples).items()}
