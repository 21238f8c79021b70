"""Shared fixtures (a single-rank gloo process group with Megatron parallel state, CPU mode on;
the synthetic corpus), and the rule that makes the ``distributed`` marker mean what it says: a
test starts processes (subprocesses, spawned ranks, the rank pool) only under that marker, which
tests whose fixtures start processes get automatically; so ``-m "not distributed"`` runs in this
process alone. The unit tier never starts one (tests/unit/conftest.py)."""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import tempfile

import pytest
import torch

# Nothing in the tests reaches a hub; remote code that transformers loads in this process goes to
# a directory of this session, not the user's cache (read when transformers is first imported).
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("HF_MODULES_CACHE", tempfile.mkdtemp(prefix="adamoe-hf-modules-"))
# megatron-core 0.19 runs `git rev-parse` when first imported unless this is set: a unit test that
# happens to import it first would then start a process.
os.environ.setdefault("NO_VCS_VERSION", "1")

from tests.runs import write_synthetic_corpus  # noqa: E402


@pytest.fixture(scope="session")
def single_rank():
    """World of one gloo rank with TP = PP = EP = 1, for unit tests of Megatron modules."""
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from megatron_adamoe import enable_cpu_mode

    enable_cpu_mode()
    store_dir = tempfile.mkdtemp(prefix="adamoe-store-")
    if not dist.is_initialized():
        store = dist.FileStore(os.path.join(store_dir, "store"), 1)
        dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    parallel_state.initialize_model_parallel(1, 1)
    model_parallel_cuda_manual_seed(1234)
    yield
    parallel_state.destroy_model_parallel()


@pytest.fixture
def megatron_env(single_rank):
    """Per test: fixed seed, train mode, and Megatron's MoE metrics tracker emptied."""
    from megatron_adamoe.mcore._compat import clear_moe_tracker

    torch.manual_seed(1234)
    clear_moe_tracker()
    yield
    clear_moe_tracker()


@pytest.fixture(scope="session")
def synthetic_corpus(tmp_path_factory):
    """(data_path, tokenizer_model) of the synthetic corpus, written once per session by
    tools/preprocess_data.py --input synthetic."""
    return write_synthetic_corpus(tmp_path_factory.mktemp("corpus"))


# Fixtures that start processes: a test that uses one (directly or through another fixture) is
# marked distributed.
PROCESS_FIXTURES = {"synthetic_corpus", "trained", "deepspeed_extension"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if PROCESS_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.distributed)
        if item.get_closest_marker("distributed") and "tests/unit/" in item.nodeid:
            raise pytest.UsageError(f"{item.nodeid}: the unit tier starts no processes")


@pytest.fixture(autouse=True)
def processes_only_when_marked(request, monkeypatch):
    """A test not marked distributed may not start a process."""
    if request.node.get_closest_marker("distributed"):
        return

    def refuse(*args, **kwargs):
        raise AssertionError(
            f"{request.node.nodeid} starts a process: mark it distributed "
            "(@pytest.mark.distributed), outside tests/unit/"
        )

    monkeypatch.setattr(subprocess.Popen, "__init__", refuse)
    monkeypatch.setattr(multiprocessing.Process, "start", refuse)
    monkeypatch.setattr("tests.runs.rank_pool", refuse)


def pytest_sessionfinish(session, exitstatus):
    """Stop the rank pool's workers (tests/runs.py) if a test started them."""
    from tests.runs import close_rank_pool

    close_rank_pool()
