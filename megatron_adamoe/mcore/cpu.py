"""CPU mode: the one place that lets Megatron-Core's MoE path run on CPU over gloo.

Nothing here runs on import. ``enable_cpu_mode()`` applies every adaptation (idempotent) and
``disable_cpu_mode()`` restores the originals. Entry points, tests and the CPU demo call it
explicitly. Each adaptation names the upstream code (megatron-core 0.16.1, or the later version
that needs it) it stands in for.

Still CUDA-only after this: GPU weight initialisation (build with ``use_cpu_initialization=True``),
GroupedMLP / TEGroupedMLP experts, fused permutation and the flex dispatcher; a
TransformerBlock on CPU needs an explicit attention mask.
"""

from __future__ import annotations

import functools
import inspect
import logging

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode

logger = logging.getLogger(__name__)

_originals: dict[str, tuple[object, str, object]] = {}


class _NoStream:
    """Stands in for the CUDA stream the all-to-all dispatcher keeps for device-to-host copies."""

    def __repr__(self) -> str:
        return "<no CUDA stream: megatron_adamoe CPU mode>"


def _cpu_current_device() -> torch.device:
    return torch.device("cpu")


class _CpuStream(_NoStream):
    """Stands in for ``torch.cuda.current_stream()``: CPU work is in order, nothing to wait for."""

    def wait_event(self, event) -> None:
        pass

    def wait_stream(self, stream) -> None:
        pass


def _cpu_current_stream(device=None) -> _CpuStream:
    return _CpuStream()


def _maybe_dtoh_and_synchronize_cpu(self, point: str, tokens_per_expert=None):
    """Mirrors ``MoEAlltoAllTokenDispatcher._maybe_dtoh_and_synchronize``.

    Upstream copies the split sizes to the host on a side CUDA stream at ``cuda_dtoh_point`` and
    waits on an event at ``cuda_sync_point``. On CPU there is nothing to wait for: only the
    conversion of the split sizes to host integers (what the collectives take) is kept.
    """

    def to_host(value):
        return value.tolist() if torch.is_tensor(value) and value.dim() > 0 else value

    if not self.drop_and_pad and point == self.cuda_dtoh_point:
        self.input_splits = to_host(self.input_splits)
        self.output_splits = to_host(self.output_splits)
        if torch.is_tensor(self.num_out_tokens):
            self.num_out_tokens = int(self.num_out_tokens)
    return tokens_per_expert


def _gather_along_first_dim_gloo(input_, group, output_split_sizes=None, use_global_buffer=False):
    """Mirrors ``tensor_parallel.mappings._gather_along_first_dim``.

    Upstream gathers uneven splits with a list ``all_gather``, which gloo rejects. Here every rank
    pads its piece to the largest split, gathers evenly, and the padding is cut away.
    """
    world_size = group.size()
    if world_size == 1:
        return input_
    input_ = input_.contiguous()
    if output_split_sizes is None:
        output = input_.new_empty((input_.size(0) * world_size, *input_.shape[1:]))
        dist.all_gather_into_tensor(output, input_, group=group)
        return output
    max_rows = max(output_split_sizes)
    padded = input_.new_zeros((max_rows, *input_.shape[1:]))
    padded[: input_.size(0)] = input_
    gathered = input_.new_empty((max_rows * world_size, *input_.shape[1:]))
    dist.all_gather_into_tensor(gathered, padded, group=group)
    pieces = [gathered[r * max_rows : r * max_rows + n] for r, n in enumerate(output_split_sizes)]
    return torch.cat(pieces, dim=0)


def _reduce_scatter_along_first_dim_gloo(
    input_, group, input_split_sizes=None, use_global_buffer=False
):
    """Mirrors ``tensor_parallel.mappings._reduce_scatter_along_first_dim``.

    Upstream reduce-scatters uneven splits with a list ``reduce_scatter``, which gloo does not
    implement. Here the full tensor is all-reduced and each rank keeps its own split.
    """
    world_size = group.size()
    if world_size == 1:
        return input_
    input_ = input_.contiguous()
    if input_split_sizes is None:
        assert input_.size(0) % world_size == 0
        output = input_.new_empty((input_.size(0) // world_size, *input_.shape[1:]))
        dist.reduce_scatter_tensor(output, input_, group=group)
        return output
    reduced = input_.clone()
    dist.all_reduce(reduced, group=group)
    start = sum(input_split_sizes[: group.rank()])
    return reduced[start : start + input_split_sizes[group.rank()]].clone()


def _get_cpu_rng_state(device=None, clone: bool = False, graph_safe: bool = False):
    """Mirrors ``tensor_parallel.random._get_cuda_rng_state`` for the CPU generator."""
    return torch.get_rng_state()


def _set_cpu_rng_state(new_state, device=-1, graph_safe: bool = False):
    """Mirrors ``tensor_parallel.random._set_cuda_rng_state`` for the CPU generator."""
    torch.set_rng_state(new_state)


def _rng_tracker_add_cpu(self, name, seed):
    """Mirrors ``CudaRNGStatesTracker.add``: the named state is a CPU generator state."""
    if seed in self.seeds_:
        raise Exception(f"seed {seed} already exists")
    self.seeds_.add(seed)
    if name in self.states_:
        raise Exception(f"cuda rng state {name} already exists")
    original = torch.get_rng_state()
    torch.manual_seed(seed)
    self.states_[name] = torch.get_rng_state()
    torch.set_rng_state(original)


def _is_cuda_device(device) -> bool:
    if isinstance(device, int):
        return True
    return isinstance(device, (str, torch.device)) and torch.device(device).type == "cuda"


class _CudaOnCpu(TorchFunctionMode):
    """Inside upstream code that hard-codes ``device='cuda'``, the CPU stands in for the GPU.

    Tensor factories asked for a CUDA device get the CPU, ``Tensor.cuda()`` keeps the tensor where
    it is, and ``Tensor.type()`` of a CPU float tensor reports the CUDA type name that upstream
    assertions check. Only active while a wrapped upstream function runs.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _is_cuda_device(kwargs.get("device")):
            kwargs = {**kwargs, "device": "cpu"}
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            return func(*args).replace("torch.", "torch.cuda.", 1)
        return func(*args, **kwargs)


def _cuda_on_cpu(function):
    """Run an upstream function that hard-codes CUDA tensors with the CPU standing in."""

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        with _CudaOnCpu():
            return function(*args, **kwargs)

    wrapper.__wrapped_for_cpu__ = True
    return wrapper


def _patch(name: str, owner, attribute: str, replacement) -> None:
    if name not in _originals:
        _originals[name] = (owner, attribute, inspect.getattr_static(owner, attribute, None))
    setattr(owner, attribute, replacement)


def enable_cpu_mode() -> None:
    """Apply the CPU/gloo adaptations to Megatron-Core (idempotent). Call before building layers."""
    from megatron.core.tensor_parallel import mappings, random
    from megatron.core.transformer.moe import moe_utils
    from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher

    # 1. `torch.cuda.current_device()` picks the device of new buffers in Router.gating (it moves
    #    the gate weight there), TopKRouter's expert-bias buffers, tensor_parallel.mappings'
    #    collective outputs and GlobalMemoryBuffer: on CPU they all belong on the CPU.
    if not torch.cuda.is_available():
        _patch("current_device", torch.cuda, "current_device", _cpu_current_device)
    # 1b. megatron-core 0.19's _ParamAndGradBucketGroup.start_grad_sync takes
    #    `torch.cuda.current_stream()` to wait on CUDA-graph gradient events (none on CPU).
    if not torch.cuda.is_available():
        _patch("current_stream", torch.cuda, "current_stream", _cpu_current_stream)
    # 2. MoEAlltoAllTokenDispatcher.__init__: `torch.cuda.Stream()` when the class attribute
    #    `cuda_dtoh_stream` is None. A placeholder makes it skip the CUDA call.
    if MoEAlltoAllTokenDispatcher.cuda_dtoh_stream is None:
        _patch("dtoh_stream", MoEAlltoAllTokenDispatcher, "cuda_dtoh_stream", _NoStream())
    # 3. MoEAlltoAllTokenDispatcher._maybe_dtoh_and_synchronize: CUDA streams and events.
    _patch(
        "dtoh_sync",
        MoEAlltoAllTokenDispatcher,
        "_maybe_dtoh_and_synchronize",
        _maybe_dtoh_and_synchronize_cpu,
    )
    # 4. moe_utils.RouterGatingLinearFunction reads `te_general_gemm`, a name bound only when
    #    Transformer Engine imports.
    if not hasattr(moe_utils, "te_general_gemm"):
        _patch("te_general_gemm", moe_utils, "te_general_gemm", None)
    # 5. Uneven all-gather / reduce-scatter (expert-TP > 1): list collectives gloo lacks.
    _patch("gather_first", mappings, "_gather_along_first_dim", _gather_along_first_dim_gloo)
    _patch(
        "reduce_scatter_first",
        mappings,
        "_reduce_scatter_along_first_dim",
        _reduce_scatter_along_first_dim_gloo,
    )
    # 6. tensor_parallel.random's RNG tracker (dropout under `get_cuda_rng_tracker().fork()`,
    #    `model_parallel_cuda_manual_seed`) reads and sets CUDA generator states; on CPU the
    #    tracked states are CPU generator states, forked the same way.
    if not torch.cuda.is_available():
        _patch("rng_get", random, "_get_cuda_rng_state", _get_cpu_rng_state)
        _patch("rng_set", random, "_set_cuda_rng_state", _set_cpu_rng_state)
        _patch("rng_add", random.CudaRNGStatesTracker, "add", _rng_tracker_add_cpu)
    # 7. Scalars created with a literal `device='cuda'` (plus one `grad.type() ==
    #    'torch.cuda.FloatTensor'` assertion) in: FP32Optimizer.__init__ (`_scale`),
    #    clip_grads.get_grad_norm_fp32 / clip_grad_by_total_norm_fp32 / count_zeros_fp32 (as bound
    #    in optimizer.optimizer), the no-pipelining and 1F1B schedules (`total_num_tokens`), and
    #    dist_checkpointing's save-plan verification. Each runs under `_CudaOnCpu`, which hands
    #    them the CPU.
    if not torch.cuda.is_available():
        from megatron.core.dist_checkpointing.strategies import state_dict_saver
        from megatron.core.optimizer import clip_grads
        from megatron.core.optimizer import optimizer as megatron_optimizer
        from megatron.core.pipeline_parallel import schedules

        wrapped = [
            (megatron_optimizer.FP32Optimizer, "__init__"),
            (megatron_optimizer, "get_grad_norm_fp32"),
            (megatron_optimizer, "clip_grad_by_total_norm_fp32"),
            (megatron_optimizer, "count_zeros_fp32"),
            (clip_grads, "get_grad_norm_fp32"),
            (clip_grads, "clip_grad_by_total_norm_fp32"),
            (clip_grads, "count_zeros_fp32"),
            (schedules, "forward_backward_no_pipelining"),
            (schedules, "forward_backward_pipelining_without_interleaving"),
            (state_dict_saver, "verify_global_md_reuse"),
            # from megatron-core 0.19: the grad-norm group flag
            (megatron_optimizer.MegatronOptimizer, "has_grad_norm_group"),
        ]
        for owner, attribute in wrapped:
            original = getattr(owner, attribute, None)
            if original is None:  # not in this megatron-core version
                continue
            if not getattr(original, "__wrapped_for_cpu__", False):
                name = f"cuda_on_cpu:{getattr(owner, '__name__', owner)}.{attribute}"
                _patch(name, owner, attribute, _cuda_on_cpu(original))
    # 8. FileSystemWriterAsync.preload_tensors (dist_checkpointing's torch_dist writer) copies
    #    tensors to the host with non_blocking=True and then calls torch.cuda.synchronize(); CPU
    #    tensors need a plain blocking copy and no synchronisation.
    if not torch.cuda.is_available():
        from megatron.core.dist_checkpointing.strategies.filesystem_async import (
            FileSystemWriterAsync,
        )

        preload = FileSystemWriterAsync.preload_tensors
        if not getattr(preload, "__wrapped_for_cpu__", False):

            def preload_tensors_blocking(write_buckets, non_blocking=True):
                return preload(write_buckets, non_blocking=False)

            preload_tensors_blocking.__wrapped_for_cpu__ = True
            _patch(
                "preload_tensors",
                FileSystemWriterAsync,
                "preload_tensors",
                staticmethod(preload_tensors_blocking),
            )
    # 9. TopKRouter._apply_expert_bias (the expert-bias token count) is decorated with Megatron's
    #    jit_fuser, torch.compile: its first call on CPU starts an Inductor C++ build (g++,
    #    minutes). Run the undecorated function, the same arithmetic.
    from megatron.core.transformer.moe.router import TopKRouter

    count = TopKRouter.__dict__["_apply_expert_bias"]
    eager = getattr(count, "_torchdynamo_orig_callable", None)
    if eager is not None:
        _patch("expert_bias_eager", TopKRouter, "_apply_expert_bias", eager)
    logger.debug("megatron_adamoe CPU mode enabled: %s", sorted(_originals))


def disable_cpu_mode() -> None:
    """Undo :func:`enable_cpu_mode`."""
    for owner, attribute, original in _originals.values():
        if original is None and attribute == "te_general_gemm":
            delattr(owner, attribute)
        else:
            setattr(owner, attribute, original)
    _originals.clear()
