"""CPU mode: the CUDA stand-in is scoped to the wrapped upstream functions; it undoes cleanly."""

from __future__ import annotations

import pytest
import torch

from megatron_adamoe.mcore import cpu

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only adaptations")


def test_cuda_on_cpu_hands_upstream_cuda_scalars_to_the_cpu():
    def upstream():  # what Megatron's optimizer and clip_grads do
        scale = torch.tensor([1.0], dtype=torch.float, device="cuda")
        buffer = torch.zeros(1, dtype=torch.int, device="cuda").cuda()
        return scale, buffer, scale.type()

    scale, buffer, type_name = cpu._cuda_on_cpu(upstream)()
    assert scale.device.type == "cpu" and buffer.device.type == "cpu"
    assert type_name == "torch.cuda.FloatTensor"
    with pytest.raises((AssertionError, RuntimeError)):  # outside the wrapper CUDA stays CUDA
        upstream()


def test_enable_is_idempotent_and_disable_restores_every_upstream_attribute(single_rank):
    from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync
    from megatron.core.optimizer import optimizer as megatron_optimizer
    from megatron.core.pipeline_parallel import schedules

    cpu.enable_cpu_mode()
    wrapped_schedule = schedules.forward_backward_no_pipelining
    cpu.enable_cpu_mode()  # a second call wraps nothing twice
    assert schedules.forward_backward_no_pipelining is wrapped_schedule
    assert wrapped_schedule.__wrapped_for_cpu__
    cpu.disable_cpu_mode()
    try:
        assert not hasattr(schedules.forward_backward_no_pipelining, "__wrapped_for_cpu__")
        assert not hasattr(megatron_optimizer.FP32Optimizer.__init__, "__wrapped_for_cpu__")
        assert isinstance(FileSystemWriterAsync.__dict__["preload_tensors"], staticmethod)
        assert not hasattr(FileSystemWriterAsync.preload_tensors, "__wrapped_for_cpu__")
    finally:
        cpu.enable_cpu_mode()  # the session's other tests run in CPU mode
