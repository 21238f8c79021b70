"""The pretraining entry point with a user-input error on rank 1 alone (after the process group
exists): as if a file were missing on one node. Run under torchrun by
tests/training/test_launch.py."""

import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)

from megatron_adamoe.data import corpus  # noqa: E402
from megatron_adamoe.errors import OptionError  # noqa: E402
from megatron_adamoe.training import pretrain  # noqa: E402


def _missing_on_this_node(model_path):
    raise OptionError(
        "tokenizer_model ('rank-1-only.model') must be readable on every rank; copy it to this node"
    )


if __name__ == "__main__":
    if os.environ.get("RANK") == "1":
        corpus.load_tokenizer = _missing_on_this_node
    sys.exit(pretrain.main())
