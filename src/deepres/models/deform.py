"""Deformable convolution (Dai et al. 2017, "Deformable Convolutional Networks", arXiv:1703.06211) in a ResNet-50.

A :class:`DeformConv2d` is a convolution whose regular k x k sampling grid is shifted, at every output position, by
learned 2D offsets; the input is sampled at the shifted, fractional positions by bilinear interpolation (section 2.1).
A plain conv over the same input, with the same kernel, stride and padding, predicts the 2 k^2 offsets. It starts at
zero, so an untrained deformable conv computes exactly its plain convolution. The sampling is torchvision's
``deform_conv2d`` operator.

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

__all__ = ["DeformConv2d", "deform_resnet", "register_onnx_deform_conv"]

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
