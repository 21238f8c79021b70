"""GPU tier: AdaMoE with Transformer Engine grouped-GEMM experts, FP8 and fused permute.

Skipped without CUDA (and without Transformer Engine). The reference is the same layer with the
same weights computed by the unfused local experts (SequentialMLP) in bf16; the stock top-k
layer with TE is the reference for m = 0.
"""

from __future__ import annotations

import os
import tempfile

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)
pytest.importorskip("transformer_engine")

import torch.distributed as dist  # noqa: E402
from megatron.core import parallel_state  # noqa: E402
from megatron.core.fp8_utils import get_fp8_context  # noqa: E402
from megatron.core.models.gpt.gpt_layer_specs import (  # noqa: E402
    get_gpt_layer_with_transformer_engine_spec,
)
from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed  # noqa: E402
from megatron.core.transformer.transformer_config import TransformerConfig  # noqa: E402

from megatron_adamoe import AdaMoEConfig, get_adamoe_gpt_layer_spec  # noqa: E402
from megatron_adamoe.mcore._compat import build_mlp  # noqa: E402

pytestmark = pytest.mark.gpu

N, M, K, HIDDEN, FFN, TOKENS = 8, 8, 3, 256, 512, 1000  # 1000: counts not multiples of 16
BASE = dict(
    num_layers=1,
    hidden_size=HIDDEN,
    num_attention_heads=4,
    num_moe_experts=N,
    moe_ffn_hidden_size=FFN,
    moe_router_topk=K,
    moe_token_dispatcher_type="alltoall",
    moe_aux_loss_coeff=0.0,
    add_bias_linear=False,
    gated_linear_unit=True,
    activation_func=torch.nn.functional.silu,
    bf16=True,
    params_dtype=torch.bfloat16,
    moe_router_dtype="fp32",
)


def _capability() -> tuple:
    return torch.cuda.get_device_capability()


RECIPES = [
    pytest.param("delayed", id="delayed"),
    pytest.param("tensorwise", id="current-scaling"),
    pytest.param(
        "blockwise",
        id="blockwise",
        marks=pytest.mark.skipif(
            _capability() < (9, 0), reason="blockwise FP8 needs Hopper or newer"
        ),
    ),
    pytest.param(
        "mxfp8",
        id="mxfp8",
        marks=pytest.mark.skipif(_capability() < (10, 0), reason="MXFP8 needs Blackwell"),
    ),
]


@pytest.fixture(scope="module")
def cuda_rank():
    store = dist.FileStore(os.path.join(tempfile.mkdtemp(), "store"), 1)
    if not dist.is_initialized():
        dist.init_process_group("nccl", store=store, rank=0, world_size=1)
    torch.cuda.set_device(0)
    parallel_state.initialize_model_parallel(1, 1)
    model_parallel_cuda_manual_seed(1234)
    yield
    parallel_state.destroy_model_parallel()


def _layer(config, grouped: bool, stock: bool = False):
    if stock:
        spec = get_gpt_layer_with_transformer_engine_spec(num_experts=N, moe_grouped_gemm=grouped)
    else:
        spec = get_adamoe_gpt_layer_spec(N, use_transformer_engine=True, moe_grouped_gemm=grouped)
    layer = build_mlp(spec.submodules.mlp, config).cuda()
    layer.set_layer_number(1)
    return layer


def _copy_weights(source, target) -> None:
    """Router and experts: TEGroupedMLP keeps ``linear_fc1.weight{i}``, SequentialMLP keeps
    ``local_experts.{i}.linear_fc1.weight``."""
    with torch.no_grad():
        target.router.weight.copy_(source.router.weight)
        for i in range(N):
            for fc in ("linear_fc1", "linear_fc2"):
                src = _expert_weight(source.experts, fc, i)
                _expert_weight(target.experts, fc, i).copy_(src)


def _expert_weight(experts, fc: str, i: int) -> torch.Tensor:
    if hasattr(experts, "local_experts"):
        return getattr(experts.local_experts[i], fc).weight
    return getattr(getattr(experts, fc), f"weight{i}")


def _pair(null_type="zero", fp8_recipe=None, permute_fusion=False, **overrides):
    fp8 = dict(fp8="hybrid", fp8_recipe=fp8_recipe) if fp8_recipe else {}
    grouped = AdaMoEConfig(
        **BASE,
        adamoe_num_null_experts=M,
        adamoe_null_expert_type=null_type,
        moe_grouped_gemm=True,
        moe_permute_fusion=permute_fusion,
        **fp8,
        **overrides,
    )
    unfused = AdaMoEConfig(
        **BASE,
        adamoe_num_null_experts=M,
        adamoe_null_expert_type=null_type,
        moe_grouped_gemm=False,
        **overrides,
    )
    torch.manual_seed(0)
    reference = _layer(unfused, grouped=False)
    layer = _layer(grouped, grouped=True)
    _copy_weights(reference, layer)
    return layer, reference


def _run(layer, x, config=None):
    x = x.clone().requires_grad_(True)
    with get_fp8_context(config) if config is not None else torch.enable_grad():
        out, _ = layer(x)
    out.float().square().sum().backward()
    return out.float(), x.grad.float()


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp(min=1e-12)).item()


def _tokens(seed: int = 1) -> torch.Tensor:
    generator = torch.Generator(device="cuda").manual_seed(seed)
    return torch.randn(TOKENS, 1, HIDDEN, device="cuda", dtype=torch.bfloat16, generator=generator)


@pytest.mark.parametrize("null_type", ["zero", "identity"])
@pytest.mark.parametrize("permute_fusion", [False, True], ids=["unfused-permute", "fused"])
def test_bf16_grouped_gemm_equals_unfused_experts(cuda_rank, null_type, permute_fusion):
    layer, reference = _pair(null_type, permute_fusion=permute_fusion)
    x = _tokens()
    out, grad = _run(layer, x)
    expected_out, expected_grad = _run(reference, x)
    assert _relative_error(out, expected_out) < 1e-2
    assert _relative_error(grad, expected_grad) < 1e-2


@pytest.mark.parametrize("recipe", RECIPES)
def test_fp8_grouped_gemm_tracks_unfused_bf16(cuda_rank, recipe):
    """Per-expert counts of 1000 tokens x k picks are rarely multiples of 16 (32 for MXFP8):
    TEGroupedMLP pads them locally (Fp8Padding); nothing padded crosses the all-to-all."""
    layer, reference = _pair("identity", fp8_recipe=recipe)
    x = _tokens()
    out, grad = _run(layer, x, layer.config)
    expected_out, expected_grad = _run(reference, x)
    assert torch.isfinite(out).all() and torch.isfinite(grad).all()
    assert _relative_error(out, expected_out) < 0.1
    assert _relative_error(grad, expected_grad) < 0.15


@pytest.mark.parametrize("recipe", [None, "delayed"], ids=["bf16", "fp8"])
@pytest.mark.parametrize("permute_fusion", [False, True], ids=["unfused-permute", "fused"])
def test_all_null_tokens_and_zero_token_experts(cuda_rank, recipe, permute_fusion):
    """Null rows far above true rows: every token picks nulls only, every expert gets zero
    tokens. Zero nulls give exactly zero; identity nulls (true_experts) pass x through."""
    for null_type in ("zero", "identity"):
        layer, _ = _pair(null_type, fp8_recipe=recipe, permute_fusion=permute_fusion)
        with torch.no_grad():
            layer.router.weight.zero_()
            layer.router.weight[N:] = 1.0  # + all-positive tokens: nulls win everywhere
        x = _tokens().abs()
        out, grad = _run(layer, x, layer.config if recipe else None)
        expected = torch.zeros_like(out) if null_type == "zero" else x.float()
        torch.testing.assert_close(out, expected, atol=0, rtol=0)
        assert torch.isfinite(grad).all()


def test_some_experts_receive_no_tokens(cuda_rank):
    layer, reference = _pair("zero", fp8_recipe="delayed")
    for module in (layer, reference):
        with torch.no_grad():
            module.router.weight[:3] = -1.0  # positive tokens: experts 0..2 never picked
    x = _tokens().abs()
    counts = []
    layer.experts.register_forward_pre_hook(
        lambda module, args: counts.append([int(c) for c in args[1]])
    )
    out, _ = _run(layer, x, layer.config)
    expected, _ = _run(reference, x)
    assert counts and counts[0][:3] == [0, 0, 0] and sum(counts[0]) > 0
    assert _relative_error(out, expected) < 0.1


def test_no_nulls_equals_stock_topk_with_transformer_engine(cuda_rank):
    config = dict(BASE, moe_grouped_gemm=True, moe_router_topk=2)
    stock = _layer(TransformerConfig(**config), grouped=True, stock=True)
    adamoe = _layer(AdaMoEConfig(**config, adamoe_num_null_experts=0), grouped=True)
    adamoe.load_state_dict(stock.state_dict())
    x = _tokens()
    out, grad = _run(adamoe, x)
    expected_out, expected_grad = _run(stock, x)
    assert torch.equal(out, expected_out) and torch.equal(grad, expected_grad)


def test_entry_point_passes_fp8_options_to_the_config(tmp_path):
    from megatron_adamoe.options import PretrainArguments, validate
    from megatron_adamoe.training.model import layer_spec_backend, transformer_config

    args = PretrainArguments(
        bf16=True, fp8_format="hybrid", fp8_recipe="tensorwise", moe_grouped_gemm=True
    )
    validate(args, check_io=False)
    config = transformer_config(args, on_gpu=True)
    assert (config.fp8, config.fp8_recipe, config.bf16) == ("hybrid", "tensorwise", True)
    assert layer_spec_backend(args, on_gpu=True, has_te=True) == "transformer_engine"
