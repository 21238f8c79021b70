"""Independent references for AdaMoE layers: a dense per-token loop and weight plumbing.

Nothing here calls megatron_adamoe: the routing, weight normalisation and the paper's Eq. 6 are
written out again, token by token, from the paper's definitions (AdaMoE, Zeng et al. 2024,
section 3: routing over true + null experts, the weight norms, Eq. 6).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class FullWeights:
    """All weights of one AdaMoE layer, unsharded. Experts: fc1 [E, F or 2F, H], fc2 [E, H, F]."""

    router: torch.Tensor
    fc1: torch.Tensor
    fc2: torch.Tensor

    def requires_grad_(self) -> "FullWeights":
        for tensor in (self.router, self.fc1, self.fc2):
            tensor.requires_grad_(True)
        return self


def make_full_weights(seed, hidden, ffn, num_true, num_null, glu=False, router_scale=1.0):
    generator = torch.Generator().manual_seed(seed)
    fc1_rows = 2 * ffn if glu else ffn
    return FullWeights(
        router=torch.randn(num_true + num_null, hidden, generator=generator) * router_scale,
        fc1=torch.randn(num_true, fc1_rows, hidden, generator=generator) * hidden**-0.5,
        fc2=torch.randn(num_true, hidden, ffn, generator=generator) * ffn**-0.5,
    )


def expert_forward(x_H, fc1, fc2, glu):
    hidden = fc1 @ x_H
    if glu:
        gate, up = torch.chunk(hidden, 2, dim=-1)
        hidden = F.gelu(gate) * up
    else:
        hidden = F.gelu(hidden)
    return fc2 @ hidden


def choose_experts(logits_X, topk, selection_bias=None, topp=None):
    """The picks of one token: the k best by logits + bias; under top-p the shortest prefix of
    them (in that order) whose mass under q = softmax(logits + bias) reaches p."""
    scores_X = logits_X if selection_bias is None else logits_X + selection_bias
    order = torch.argsort(scores_X, descending=True)[:topk].tolist()
    if topp is None:
        return order
    q_X = torch.softmax(scores_X, dim=-1)
    picks, mass = [], 0.0
    for i in order:
        if mass >= topp:
            break
        picks.append(i)
        mass += float(q_X[i])
    return picks


def dense_adamoe_layer(
    x_TH, weights, topk, weight_norm, null_type, glu=False, selection_bias=None, topp=None
):
    """Per-token AdaMoE layer. Returns (y [T, H], selections: list of (true picks, null picks)).
    The bias and top-p change which experts are picked; the weights use p = softmax(logits)."""
    num_true = weights.fc1.shape[0]
    outputs, selections = [], []
    for x_H in x_TH:
        logits_X = weights.router @ x_H
        p_X = torch.softmax(logits_X, dim=-1)
        picks = choose_experts(logits_X.detach(), topk, selection_bias, topp)
        true_picks = [i for i in picks if i < num_true]
        null_picks = [i for i in picks if i >= num_true]
        mass_selected = sum(p_X[i] for i in picks)
        mass_true = sum(p_X[i] for i in true_picks) if true_picks else None
        mass_null = sum(p_X[i] for i in null_picks) if null_picks else torch.zeros(())
        if weight_norm == "true_experts":
            denominator = mass_true
            identity_weight = mass_null / mass_selected
        elif weight_norm == "all_selected":
            denominator = mass_selected
            identity_weight = mass_null / mass_selected
        else:
            denominator = 1.0
            identity_weight = mass_null
        y_H = torch.zeros_like(x_H)
        for i in true_picks:
            y_H = y_H + (p_X[i] / denominator) * expert_forward(
                x_H, weights.fc1[i], weights.fc2[i], glu
            )
        if null_type == "identity":
            y_H = y_H + identity_weight * x_H
        outputs.append(y_H)
        selections.append((true_picks, null_picks))
    return torch.stack(outputs), selections


def eq6_loss(
    x_TH, router_weight, topk, num_null, coeff, selection_bias=None, topp=None, target_load=None
):
    """Paper Eq. 6 with the null bucket, written from its definition for one batch of tokens;
    counts follow the actual picks. With ``target_load`` tau each expert's term is divided by its
    target share: tau / (k n) per true expert, (1 - tau / k) / m per null expert."""
    num_experts = router_weight.shape[0]
    num_true = num_experts - num_null
    num_tokens = x_TH.shape[0]
    logits_TX = x_TH @ router_weight.T
    p_TX = torch.softmax(logits_TX, dim=-1)
    counts = [0.0] * num_experts
    for t in range(num_tokens):
        for i in choose_experts(logits_TX[t].detach(), topk, selection_bias, topp):
            counts[i] += 1.0
    f = [c / (topk * num_tokens) for c in counts]
    if num_null:
        null_mean = sum(f[num_true:]) / num_null
        f = f[:num_true] + [null_mean] * num_null
    share = [1.0 / num_experts] * num_experts
    if target_load is not None:
        share = [target_load / (topk * num_true)] * num_true + [
            (1 - target_load / topk) / num_null
        ] * num_null
    P = p_TX.mean(dim=0)
    return coeff * sum(f[i] * P[i] / share[i] for i in range(num_experts))


# ---- weights in and out of Megatron's SequentialMLP experts -------------------------------------


def _fc1_rows(fc1_full_e, etp_rank, etp_size, glu):
    if not glu:
        rows = fc1_full_e.shape[0] // etp_size
        return fc1_full_e[etp_rank * rows : (etp_rank + 1) * rows]
    gate, up = torch.chunk(fc1_full_e, 2, dim=0)
    rows = gate.shape[0] // etp_size
    piece = slice(etp_rank * rows, (etp_rank + 1) * rows)
    return torch.cat([gate[piece], up[piece]], dim=0)


def _fc2_cols(fc2_full_e, etp_rank, etp_size):
    cols = fc2_full_e.shape[1] // etp_size
    return fc2_full_e[:, etp_rank * cols : (etp_rank + 1) * cols]


def local_expert_ids(layer):
    return list(layer.local_expert_indices)


def load_full_weights(layer, weights, etp_rank=0, etp_size=1, glu=False):
    """Copy unsharded weights into an AdaMoE (or stock) MoELayer's router and local experts."""
    with torch.no_grad():
        layer.router.weight.copy_(weights.router)
        for local, expert in enumerate(local_expert_ids(layer)):
            mlp = layer.experts.local_experts[local]
            mlp.linear_fc1.weight.copy_(_fc1_rows(weights.fc1[expert], etp_rank, etp_size, glu))
            mlp.linear_fc2.weight.copy_(_fc2_cols(weights.fc2[expert], etp_rank, etp_size))


def local_expert_grads(layer):
    """[(global expert id, fc1 grad, fc2 grad)] of the layer's local experts."""
    return [
        (
            expert,
            layer.experts.local_experts[local].linear_fc1.weight.grad,
            layer.experts.local_experts[local].linear_fc2.weight.grad,
        )
        for local, expert in enumerate(local_expert_ids(layer))
    ]


def expected_expert_grads(full_fc1_grad, full_fc2_grad, expert, etp_rank, etp_size, glu):
    return (
        _fc1_rows(full_fc1_grad[expert], etp_rank, etp_size, glu),
        _fc2_cols(full_fc2_grad[expert], etp_rank, etp_size),
    )
