"""Deformable convolution (Dai et al. 2017, "Deformable Convolutional Networks", arXiv:1703.06211) in a ResNet-50.

A :class:`DeformConv2d` is a convolution whose regular k x k sampling grid is shifted, at every output position, by
learned 2D offsets; the input is sampled at the shifted, fractional positions by bilinear interpolation (section 2.1).
A plain conv over the same input, with the same kernel, stride and padding, predicts the 2 k^2 offsets. It starts at
zero, so an untrained deformable conv computes exactly its plain convolution. The sampling is torchvision's
``deform_conv2d`` operator.

On the CPU the sampling and its gradients run as gathers, scatter-adds and one matrix product per conv
(:class:`DeformConvCPU`): torchvision's CPU kernel loops over positions, and ``deepres benchmark deform-cpu`` times
``deform_resnet50``'s thirteen deformable convs at batch 128 (forward and backward) 3.25x faster here (10.3 s against
33.6 s on 2 cores). Equal to torchvision's operator in float64 (forward and every gradient); traced exports and GPUs
use torchvision's operator.

``deform_resnet50`` makes the 3x3 conv of every bottleneck in stages conv3_x to conv5_x (``layer2`` .. ``layer4``)
deformable, as Zhu et al. 2019 (Deformable ConvNets v2) do; ``stages=(4,)`` keeps to conv5_x, closer to the first
paper. Parameter names are ResNet-50's plus ``.offset`` in each deformable conv, so a ResNet-50 state dict loads with
``strict=False`` and gives the same outputs.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torchvision.ops

from .registry import register_model
from .resnet import Bottleneck, ResNet, imagenet_resnet

__all__ = ["DeformConv2d", "DeformConvCPU", "deform_resnet", "register_onnx_deform_conv"]

LOW_PRECISION = {torch.bfloat16, torch.float16}
ONNX_OPSET = 19  # the first ONNX opset with DeformConv


class DeformConv2d(nn.Conv2d):
    """A :class:`torch.nn.Conv2d` sampling at learned offsets; ``offset`` is the conv that predicts them (zero init).

    ``offset_groups`` input-channel groups get their own offsets (1 in the paper).
    """

    def __init__(self, *args, offset_groups: int = 1, **kwargs):
        super().__init__(*args, **kwargs)
        if self.padding_mode != "zeros" or isinstance(self.padding, str):
            raise ValueError("DeformConv2d supports only numeric zero padding")
        if self.in_channels % offset_groups:
            raise ValueError(f"in_channels {self.in_channels} is not divisible by offset_groups {offset_groups}")
        kh, kw = self.kernel_size
        self.offset = nn.Conv2d(
            self.in_channels,
            2 * offset_groups * kh * kw,
            self.kernel_size,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
        )
        nn.init.zeros_(self.offset.weight)
        nn.init.zeros_(self.offset.bias)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, offset_groups: int = 1) -> DeformConv2d:
        """A deformable conv with ``conv``'s geometry and weights (zero offsets: the same function at first)."""
        module = cls(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            stride=conv.stride,
            padding=conv.padding,
            dilation=conv.dilation,
            groups=conv.groups,
            bias=conv.bias is not None,
            offset_groups=offset_groups,
            device=conv.weight.device,
            dtype=conv.weight.dtype,
        )
        with torch.no_grad():
            module.weight.copy_(conv.weight)
            if conv.bias is not None:
                module.bias.copy_(conv.bias)
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        offset = self.offset(x)
        if x.device.type == "cpu" and not (torch.jit.is_tracing() or torch.jit.is_scripting()):
            return DeformConvCPU.apply(x, offset, self.weight, self.bias, self.stride, self.padding, self.dilation,
                                       self.groups, offset.shape[1] // (2 * self.kernel_size[0] * self.kernel_size[1]))
        if not {x.dtype, offset.dtype, self.weight.dtype} & LOW_PRECISION:
            return torchvision.ops.deform_conv2d(x, offset, self.weight, self.bias, stride=self.stride,
                                                 padding=self.padding, dilation=self.dilation)
        # torchvision's kernels lack bf16 (and the CPU one fp16), and it has no CPU autocast rule: the sampling and the
        # product run in fp32, as its CUDA autocast rule does, and the output takes the input's dtype.
        bias = None if self.bias is None else self.bias.float()
        with torch.autocast(x.device.type, enabled=False):
            out = torchvision.ops.deform_conv2d(x.float(), offset.float(), self.weight.float(), bias,
                                                stride=self.stride, padding=self.padding, dilation=self.dilation)
        return out.to(x.dtype)

    def macs(self, output: torch.Tensor) -> int:
        """Multiply-adds of the convolution and of the offset conv (the bilinear sampling is not counted)."""
        kh, kw = self.kernel_size
        positions = output.numel() // self.out_channels  # N * H_out * W_out, shared by both convs
        conv = output.numel() * (self.in_channels // self.groups) * kh * kw
        offsets = positions * self.offset.out_channels * self.in_channels * kh * kw
        return conv + offsets


def _sampling(offset, size, kernel, stride, padding, dilation, groups, dtype):
    """Where each kernel point of each output position samples: for the four corners of its bilinear cell, the rows
    of the (N * offset groups * H * W, channels per group) input table (clamped into the image), 1 where the corner
    lies in the image (else 0), and the corner's bilinear weight (0 outside: zero padding, as torchvision). Also the
    fractional parts (1 - ly, 1 - lx, ly, lx), for the offsets' gradient. Rows are ordered (n, position, group,
    kernel point)."""
    n, _, ho, wo = offset.shape
    (h, w), (kh, kw), device = size, kernel, offset.device
    points = kh * kw
    off = offset.to(dtype).view(n, groups, points, 2, ho, wo).permute(0, 4, 5, 1, 2, 3)  # (N, Ho, Wo, G, K, dy/dx)
    ky = (torch.arange(kh, device=device) * dilation[0]).repeat_interleave(kw).to(dtype)
    kx = (torch.arange(kw, device=device) * dilation[1]).repeat(kh).to(dtype)
    oy = (torch.arange(ho, device=device) * stride[0] - padding[0]).to(dtype)
    ox = (torch.arange(wo, device=device) * stride[1] - padding[1]).to(dtype)
    py = oy.view(1, ho, 1, 1, 1) + ky.view(1, 1, 1, 1, points) + off[..., 0]  # (N, Ho, Wo, G, K)
    px = ox.view(1, 1, wo, 1, 1) + kx.view(1, 1, 1, 1, points) + off[..., 1]
    y0, x0 = py.floor(), px.floor()
    ly, lx = py - y0, px - x0
    hy, hx = 1 - ly, 1 - lx
    base = (torch.arange(n, device=device).view(n, 1, 1, 1, 1) * groups
            + torch.arange(groups, device=device).view(1, 1, 1, groups, 1)) * (h * w)
    corners = []
    for dy, dx, wy, wx in ((0, 0, hy, hx), (0, 1, hy, lx), (1, 0, ly, hx), (1, 1, ly, lx)):
        yc, xc = y0 + dy, x0 + dx
        inside = (yc >= 0) & (yc < h) & (xc >= 0) & (xc < w)
        rows = (base + (yc.clamp(0, h - 1) * w + xc.clamp(0, w - 1)).long()).reshape(-1)
        corners.append((rows, inside.reshape(-1).to(dtype), (wy * wx * inside).reshape(-1)))
    return corners, (hy, hx, ly, lx)


def _weight_rows(weight: torch.Tensor, groups: int, offset_groups: int, dtype) -> torch.Tensor:
    """The weight as (conv groups, out channels per group, columns) in the columns' order: (offset group, kernel
    point, channel) for an ungrouped conv (the large columns stay as gathered), (channel, kernel point) per group
    otherwise (the columns are transposed to that)."""
    out, per_group, kh, kw = weight.shape
    if groups == 1:
        return weight.to(dtype).view(out, offset_groups, per_group // offset_groups, kh * kw).transpose(2, 3) \
            .reshape(1, out, -1)
    return weight.to(dtype).view(groups, out // groups, per_group * kh * kw)


def _columns(rows: torch.Tensor, shape: tuple, groups: int) -> torch.Tensor:
    """Gathered (N * L * G * K, C / G) rows as (N, L, conv groups, columns) in :func:`_weight_rows`' order."""
    n, positions, offset_groups, points, channels = shape
    if groups == 1:
        return rows.view(n, positions, 1, -1)
    return rows.view(n, positions, offset_groups, points, channels).transpose(3, 4).reshape(n, positions, groups, -1)


class DeformConvCPU(torch.autograd.Function):
    """torchvision's ``deform_conv2d`` (no mask) for the CPU: the bilinear samples of every kernel point gathered into
    columns (four row gathers of the channels-last input), one matrix product with the weight; the backward
    recomputes the columns and scatter-adds the input's gradient. Computes in fp32 (fp64 for fp64 input) and returns
    the input's dtype. ``apply(x, offset, weight, bias, stride, padding, dilation, groups, offset_groups)``."""

    @staticmethod
    def forward(ctx, x, offset, weight, bias, stride, padding, dilation, groups, offset_groups):
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        with torch.autocast("cpu", enabled=False):
            n, c, h, w = x.shape
            out_channels, _, kh, kw = weight.shape
            ho, wo = offset.shape[-2:]
            shape = (n, ho * wo, offset_groups, kh * kw, c // offset_groups)
            corners, _ = _sampling(offset, (h, w), (kh, kw), stride, padding, dilation, offset_groups, dtype)
            table = x.to(dtype).reshape(n, offset_groups, c // offset_groups, h * w).transpose(2, 3) \
                .reshape(-1, c // offset_groups)
            columns = None
            for rows, _, weights in corners:
                part = table.index_select(0, rows).mul_(weights[:, None])
                columns = part if columns is None else columns.add_(part)
            out = torch.einsum("nljq,joq->nljo", _columns(columns, shape, groups),
                               _weight_rows(weight, groups, offset_groups, dtype)).reshape(n, ho * wo, out_channels)
            if bias is not None:
                out = out + bias.to(dtype)
        ctx.save_for_backward(x, offset, weight)
        ctx.settings = (stride, padding, dilation, groups, offset_groups, bias is not None)
        return out.view(n, ho, wo, out_channels).permute(0, 3, 1, 2).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        x, offset, weight = ctx.saved_tensors
        stride, padding, dilation, groups, offset_groups, has_bias = ctx.settings
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        with torch.autocast("cpu", enabled=False):
            n, c, h, w = x.shape
            out_channels, _, kh, kw = weight.shape
            ho, wo = offset.shape[-2:]
            per_group = c // offset_groups
            shape = (n, ho * wo, offset_groups, kh * kw, per_group)
            corners, (hy, hx, ly, lx) = _sampling(offset, (h, w), (kh, kw), stride, padding, dilation,
                                                  offset_groups, dtype)
            table = x.to(dtype).reshape(n, offset_groups, per_group, h * w).transpose(2, 3).reshape(-1, per_group)
            grad_out = grad.to(dtype).permute(0, 2, 3, 1).reshape(n, ho * wo, groups, out_channels // groups)
            values = [table.index_select(0, rows) for rows, _, _ in corners]
            columns = values[0] * corners[0][2][:, None]
            for value, (_, _, weights) in zip(values[1:], corners[1:]):
                columns.add_(value * weights[:, None])
            grad_weight = torch.einsum("nljo,nljq->joq", grad_out, _columns(columns, shape, groups))
            del columns
            if groups == 1:
                grad_weight = grad_weight.view(out_channels, offset_groups, kh * kw, per_group).transpose(2, 3)
            grad_weight = grad_weight.reshape(weight.shape).to(weight.dtype)
            grad_columns = torch.einsum("nljo,joq->nljq", grad_out, _weight_rows(weight, groups, offset_groups, dtype))
            if groups == 1:
                grad_columns = grad_columns.reshape(-1, per_group)
            else:
                grad_columns = grad_columns.reshape(n, ho * wo, offset_groups, per_group, kh * kw).transpose(3, 4) \
                    .reshape(-1, per_group)
            grad_table = torch.zeros_like(table)
            along = []  # d loss / d (corner weight), per sample
            for value, (rows, inside, weights) in zip(values, corners):
                grad_table.index_add_(0, rows, grad_columns * weights[:, None])
                along.append(torch.linalg.vecdot(grad_columns, value) * inside)
            del values
            s00, s01, s10, s11 = (t.view(hy.shape) for t in along)
            grad_y = (s10 - s00) * hx + (s11 - s01) * lx
            grad_x_pos = (s01 - s00) * hy + (s11 - s10) * ly
            grad_offset = torch.stack([grad_y, grad_x_pos], dim=-1).permute(0, 3, 4, 5, 1, 2).reshape(offset.shape)
            grad_input = grad_table.view(n, offset_groups, h * w, per_group).transpose(2, 3).reshape(n, c, h, w)
            grad_bias = grad_out.sum((0, 1)).reshape(out_channels).to(weight.dtype) if has_bias else None
        return (grad_input.to(x.dtype), grad_offset.to(offset.dtype), grad_weight, grad_bias,
                None, None, None, None, None)


def register_onnx_deform_conv() -> int:
    """Teach torch.onnx's TorchScript-based exporter torchvision's ``deform_conv2d`` as ONNX's ``DeformConv``, and
    return the opset that has it (torchvision registers ONNX forms for nms and roi_align, not this one)."""
    from torch.onnx import register_custom_op_symbolic
    from torch.onnx.symbolic_helper import parse_args

    @parse_args("v", "v", "v", "v", "v", "i", "i", "i", "i", "i", "i", "i", "i", "b")
    def symbolic(g, x, weight, offset, mask, bias, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, groups,
                 offset_groups, use_mask):
        inputs = [x, weight, offset, bias] + ([mask] if use_mask else [])
        return g.op("DeformConv", *inputs, dilations_i=[dil_h, dil_w], group_i=groups, offset_group_i=offset_groups,
                    pads_i=[pad_h, pad_w, pad_h, pad_w], strides_i=[stride_h, stride_w])

    register_custom_op_symbolic("torchvision::deform_conv2d", symbolic, ONNX_OPSET)
    return ONNX_OPSET


def deform_resnet(depth: int = 50, *, stages: tuple[int, ...] = (2, 3, 4), offset_groups: int = 1, **options) -> ResNet:
    """A bottleneck ImageNet ResNet whose 3x3 convs in ``layer{s}`` for s in ``stages`` are deformable.

    ``options`` go to :func:`~deepres.models.resnet.imagenet_resnet` (``shortcut``, ``stride_on``, ``num_classes``,
    ``in_channels``, ``zero_init_residual``).
    """
    model = imagenet_resnet(depth, **options)
    if model.block is not Bottleneck:
        raise ValueError(f"deformable ResNets use bottleneck blocks (depth 50, 101 or 152); got depth {depth}")
    for stage in stages:
        if not 1 <= stage <= model.num_stages:
            raise ValueError(f"stages must be within 1..{model.num_stages}; got {stage}")
        for block in model.stages()[stage - 1]:
            block.conv2 = DeformConv2d.from_conv(block.conv2, offset_groups)
    return model


@register_model(family="deform", input_size=(224, 224))
def deform_resnet50(**options) -> ResNet:
    """ResNet-50 with deformable 3x3 convs in conv3_x..conv5_x (Dai et al. 2017; Zhu et al. 2019)."""
    return deform_resnet(50, **options)
