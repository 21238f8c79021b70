"""Read the model of a Megatron dist checkpoint (torch_dist) in one process, no process group.

Model weights in a dist checkpoint are global tensors, whatever TP/EP/PP layout wrote them, so
PyTorch Distributed Checkpoint's reader gives them back directly. The run's options come from
the ``config.yaml`` the pretraining entry point writes into every checkpoint.
"""

from __future__ import annotations

import os
import re

import torch
import yaml
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint import load as dcp_load
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from megatron_adamoe.checkpoint_files import TRACKER, damaged_files, latest_checkpoint
from megatron_adamoe.errors import OptionError
from megatron_adamoe.options import PretrainArguments, resolve, settable_fields, validate

CONFIG_FILE = "config.yaml"


def find_checkpoint(path: str) -> str:
    """A checkpoint root (with the tracker) or an ``iter_N`` directory -> the iteration dir."""
    if not os.path.isdir(path):
        raise OptionError(f"load ({path!r}) must be a checkpoint directory; check the path")
    directory = latest_checkpoint(path)
    if directory is None:
        raise OptionError(
            f"load ({path!r}) must hold a Megatron dist checkpoint ({TRACKER} or "
            "metadata.json); point it at the save directory or an iter_N directory"
        )
    return directory


def read_arguments(directory: str) -> PretrainArguments:
    """The run's options from ``config.yaml``, checked by the pretraining rules (except the
    world size and data paths, which belong to the run that wrote it)."""
    path = os.path.join(directory, CONFIG_FILE)
    if not os.path.isfile(path):
        raise OptionError(
            f"load ({directory!r}) must contain {CONFIG_FILE} (written by "
            "megatron_adamoe.training.pretrain); this checkpoint has none"
        )
    try:
        with open(path) as handle:
            raw = yaml.safe_load(handle) or {}
    except yaml.YAMLError as error:
        raise OptionError(
            f"{path} must be valid YAML; restore it from the run ({error})".replace("\n", " ")
        ) from None
    if not isinstance(raw, dict):
        raise OptionError(f"{path} must be a YAML mapping of options; restore it from the run")
    fields = settable_fields()
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise OptionError(
            f"{CONFIG_FILE} keys ({', '.join(unknown)}) must be pretraining options; "
            f"{path} was not written by this version of megatron_adamoe"
        )
    args = PretrainArguments(**raw)
    validate(args, check_io=False, check_topology=False)
    return resolve(args)


def read_model_tensors(directory: str) -> dict:
    """Every model tensor of the dist checkpoint in ``directory`` (global, unsharded)."""
    reader = FileSystemReader(directory)
    try:
        metadata = reader.read_metadata()
    except Exception as error:  # noqa: BLE001 - any unreadable metadata is one user error
        raise OptionError(
            f"load ({directory!r}) must have readable dist_checkpointing metadata "
            f"(.metadata); {type(error).__name__}: {error}"
        ) from None
    _check_files(directory)
    tensors = {}
    for key, item in metadata.state_dict_metadata.items():
        if _is_model_tensor(key) and isinstance(item, TensorStorageMetadata):
            tensors[key] = torch.empty(item.size, dtype=item.properties.dtype)
    if "embedding.word_embeddings.weight" not in tensors:
        raise OptionError(
            f"load ({directory!r}) must hold a GPT model's weights "
            "(embedding.word_embeddings.weight is missing)"
        )
    try:
        dcp_load(tensors, storage_reader=reader, no_dist=True)
    except Exception as error:  # noqa: BLE001 - a corrupt shard is one user error
        raise OptionError(
            f"load ({directory!r}) must hold readable shards; copy the checkpoint "
            f"again ({type(error).__name__})"
        ) from None
    return tensors


def _is_model_tensor(key: str) -> bool:
    """Not optimizer state (``optimizer.``, ``chained_N.``) nor extra state; every other tensor
    is the model's and must be one the mapping knows (unknown ones fail the export)."""
    return not (
        key.startswith("optimizer.") or re.match(r"chained_\d+\.", key) or "_extra_state" in key
    )


def _check_files(directory: str) -> None:
    """Every data file the metadata names exists and is long enough (one line if not)."""
    problem = damaged_files(directory)
    if problem:
        raise OptionError(
            f"load ({directory!r}) must hold a complete checkpoint ({problem}); "
            "copy the checkpoint again"
        )
