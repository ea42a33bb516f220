"""Fused projections for the decode step: q/k/v, and gate/up, of each layer as one GEMV each.

At one token per row a decode step is a chain of matrix-vector products whose cost is reading the weights;
seven small GEMVs per layer reach a lower fraction of the memory bandwidth than three larger ones, and each is
a separate kernel. `ProjectionFusion` concatenates the weights of projections that read the same input into
one matrix, re-points each projection's parameter at its rows of that matrix (no extra memory: the parameters
become views), and, while `active()`, makes the first projection of a group that is called compute the whole
group with one `F.linear` and hand the other members their slices. Outputs are the same products; `restore()`
gives every parameter its own storage again (so the model saves and loads as before).

Only plain `nn.Linear` projections with the same input features, dtype and device are fused (quantized or
otherwise wrapped linears are left alone).
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

GROUPS = (("self_attn", ("q_proj", "k_proj", "v_proj")), ("mlp", ("gate_proj", "up_proj")))


class _Group:
    def __init__(self, linears: list[nn.Linear]):
        self.linears = linears
        self.sizes = [m.out_features for m in linears]
        weight = torch.cat([m.weight.detach() for m in linears], dim=0)
        biases = [m.bias for m in linears]
        if all(b is None for b in biases):
            bias = None
        else:
            bias = torch.cat([b.detach() if b is not None else weight.new_zeros(n)
                              for b, n in zip(biases, self.sizes)])
        self.weight, self.bias = weight, bias
        start = 0
        for m, n in zip(linears, self.sizes):  # the parameters become views of the fused storage
            m.weight.data = weight[start:start + n]
            if m.bias is not None:
                m.bias.data = bias[start:start + n]
            start += n
        self.pending: dict[int, torch.Tensor] = {}

    def forward_of(self, index: int):
        def forward(x: torch.Tensor) -> torch.Tensor:
            if not self.pending:  # the first member called computes the whole group
                outs = F.linear(x, self.weight, self.bias).split(self.sizes, dim=-1)
                self.pending = {i: t for i, t in enumerate(outs) if i != index}
                return outs[index]
            return self.pending.pop(index)  # a member called twice before the others raises KeyError

        return forward

    def restore(self) -> None:
        for m in self.linears:
            m.weight.data = m.weight.data.clone()
            if m.bias is not None:
                m.bias.data = m.bias.data.clone()
        self.weight = self.bias = None
        self.pending = {}


class ProjectionFusion:
    """Fused q/k/v and gate/up projections of `layers` (decoder layers), used inside `active()`."""

    def __init__(self, layers):
        self.groups: list[_Group] = []
        for layer in layers:
            for parent_name, names in GROUPS:
                parent = getattr(layer, parent_name, None)
                linears = [getattr(parent, n, None) for n in names] if parent is not None else []
                if linears and all(m is not None for m in linears) and _fusable(linears):
                    self.groups.append(_Group(linears))

    @contextlib.contextmanager
    def active(self):
        for g in self.groups:
            for i, m in enumerate(g.linears):
                m.forward = g.forward_of(i)  # an instance attribute shadows nn.Linear.forward
        try:
            yield
        finally:
            for g in self.groups:
                g.pending = {}
                for m in g.linears:
                    del m.forward

    def restore(self) -> None:
        """Give every fused parameter its own storage again (group by group: at most one group's extra copy)."""
        for g in self.groups:
            g.restore()
        self.groups = []


def _fusable(linears) -> bool:
    if not all(type(m) is nn.Linear for m in linears):
        return False
    w0 = linears[0].weight
    return all(m.in_features == linears[0].in_features and m.weight.dtype == w0.dtype
               and m.weight.device == w0.device for m in linears)
