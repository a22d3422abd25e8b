"""torchvision entries of the zoo."""

from __future__ import annotations

import torch

from ._core import BATCH, ZooEntry, register

NUM_CLASSES = 10


def _images(size: int, channels: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randn(BATCH, channels, size, size, generator=g)


def _tv(name: str, tiny, full=None, size: int = 32, full_size: int = 224, paper: bool = False):
    """Register a torchvision classifier.

    ``tiny()`` / ``full()`` return the module; ``full`` defaults to ``tiny`` (i.e. the
    default entry already is the real architecture, only the input is small).
    """

    def build(full: bool = False):
        torch.manual_seed(0)
        use_full = bool(full)
        model = (full_ctor if (use_full and full_ctor is not None) else tiny)().eval()
        return model, (_images(full_size if use_full else size),), {}

    full_ctor = full
    build.__name__ = f"build_{name}"
    build.__qualname__ = build.__name__
    return register(ZooEntry(name=name, modality="vision", family="torchvision", build=build, paper=paper))


def _m(fn_name: str, **kw):
    def make():
        import torchvision.models as tvm

        return getattr(tvm, fn_name)(weights=None, num_classes=NUM_CLASSES, **kw)

    return make


def _vit_tiny():
    from torchvision.models.vision_transformer import VisionTransformer

    return VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32,
                             mlp_dim=64, num_classes=NUM_CLASSES)


def _densenet_tiny():
    from torchvision.models.densenet import DenseNet

    return DenseNet(growth_rate=8, block_config=(2, 2, 2), num_init_features=16, bn_size=2,
                    num_classes=NUM_CLASSES)


def _convnext_tiny():
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt

    return ConvNeXt([CNBlockConfig(16, 32, 1), CNBlockConfig(32, None, 1)], num_classes=NUM_CLASSES)


def _swin_tiny(v2: bool = False):
    from torchvision.models import swin_transformer as st

    kw = {}
    if v2:
        kw = dict(block=st.SwinTransformerBlockV2, downsample_layer=st.PatchMergingV2)
    return st.SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[2, 1], num_heads=[2, 4],
                              window_size=[4, 4], stochastic_depth_prob=0.0, num_classes=NUM_CLASSES, **kw)


def _maxvit_tiny():
    from torchvision.models.maxvit import MaxVit

    return MaxVit(input_size=(32, 32), stem_channels=16, partition_size=4, block_channels=[16],
                  block_layers=[1], head_dim=8, stochastic_depth_prob=0.0, num_classes=NUM_CLASSES)


def _regnet_tiny():
    from torchvision.models.regnet import BlockParams, RegNet

    params = BlockParams.from_init_params(depth=4, w_0=16, w_a=8.0, w_m=2.0, group_width=8, se_ratio=0.25)
    return RegNet(params, num_classes=NUM_CLASSES, stem_width=16)


def _mobilenet_v2_tiny():
    from torchvision.models.mobilenetv2 import MobileNetV2

    # t, c, n, s (expansion, channels, repeats, stride)
    return MobileNetV2(num_classes=NUM_CLASSES, inverted_residual_setting=[[1, 16, 1, 1], [6, 24, 2, 2], [6, 32, 1, 2]])


def _mobilenet_v3_tiny():
    from torchvision.models.mobilenetv3 import InvertedResidualConfig as C
    from torchvision.models.mobilenetv3 import MobileNetV3

    setting = [C(16, 3, 16, 16, True, "RE", 2, 1, 1.0),  # SE + ReLU
               C(16, 3, 48, 24, False, "RE", 2, 1, 1.0),
               C(24, 5, 72, 24, True, "HS", 1, 1, 1.0),  # SE + hardswish, residual
               C(24, 3, 96, 32, False, "HS", 2, 1, 1.0)]
    return MobileNetV3(setting, last_channel=128, num_classes=NUM_CLASSES)


def _efficientnet_tiny():
    from torchvision.models.efficientnet import EfficientNet
    from torchvision.models.efficientnet import MBConvConfig as M

    return EfficientNet([M(1, 3, 1, 16, 16, 1), M(6, 3, 2, 16, 24, 2), M(6, 5, 2, 24, 32, 1)], dropout=0.2,
                        stochastic_depth_prob=0.0, num_classes=NUM_CLASSES)


def _efficientnet_v2_tiny():
    """EfficientNetV2-M's building blocks (Fused-MBConv stages, then MBConv+SE stages, 1x1 head
    conv) at a tiny depth/width."""
    from torchvision.models.efficientnet import EfficientNet
    from torchvision.models.efficientnet import FusedMBConvConfig as F
    from torchvision.models.efficientnet import MBConvConfig as M

    return EfficientNet([F(1, 3, 1, 16, 16, 1), F(4, 3, 2, 16, 24, 2), M(4, 3, 2, 24, 32, 1),
                         M(6, 3, 1, 32, 40, 1)], dropout=0.3, stochastic_depth_prob=0.0,
                        num_classes=NUM_CLASSES, last_channel=128)


def _shufflenet_tiny():
    from torchvision.models.shufflenetv2 import ShuffleNetV2

    return ShuffleNetV2([1, 1, 1], [8, 16, 32, 64, 128], num_classes=NUM_CLASSES)


def _resnet_bottleneck_tiny(**kw):
    def make():
        from torchvision.models.resnet import Bottleneck, ResNet

        return ResNet(Bottleneck, [1, 1, 1, 1], num_classes=NUM_CLASSES, **kw)

    return make


# --- the 4 torchvision architectures of the DynamicLRP paper -------------------------------
# VGG16 / ResNet-50 / EfficientNetV2-M: the default entry *is* the real architecture (random
# weights, 10 classes) on a 32x32 input; full=True only switches to a 224x224 input.
_tv("vgg16", _m("vgg16"), paper=True)
_tv("resnet50", _m("resnet50"), paper=True)
# ViT-B/16: the default is torchvision's VisionTransformer class at a tiny size (32x32, patch 8,
# 2 layers, hidden 32); full=True builds the real vit_b_16 on 224x224.
_tv("vit_b_16", _vit_tiny, full=_m("vit_b_16"), paper=True)
# EfficientNetV2-M: the real network takes ~10 s to export on 2 CPU cores, so the default entry
# is torchvision's EfficientNet class with V2-M's block types (Fused-MBConv, MBConv+SE) at a tiny
# depth; full=True builds the real efficientnet_v2_m on 224x224.
_tv("efficientnet_v2_m", _efficientnet_v2_tiny, full=_m("efficientnet_v2_m"), paper=True)

# --- more torchvision architectures -------------------------------------------------------
# (``full=...``: the default entry is a tiny instance of the same torchvision class, full=True
# builds the named real-size model.)
_tv("alexnet", _m("alexnet"), size=64)  # real architecture; needs >= 63 px
_tv("squeezenet1_1", _m("squeezenet1_1"), size=64)  # real architecture
_tv("resnet18", _m("resnet18"))  # real architecture
_tv("resnext", _resnet_bottleneck_tiny(groups=32, width_per_group=4), full=_m("resnext50_32x4d"))
_tv("densenet", _densenet_tiny, full=_m("densenet121"))
_tv("mobilenet_v2", _mobilenet_v2_tiny, full=_m("mobilenet_v2"))
_tv("mobilenet_v3", _mobilenet_v3_tiny, full=_m("mobilenet_v3_small"))
_tv("shufflenet_v2", _shufflenet_tiny, full=_m("shufflenet_v2_x0_5"))
_tv("efficientnet", _efficientnet_tiny, full=_m("efficientnet_b0"))
_tv("regnet", _regnet_tiny, full=_m("regnet_y_400mf"))
_tv("convnext", _convnext_tiny, full=_m("convnext_tiny"))
_tv("swin", _swin_tiny, full=_m("swin_t"))
_tv("maxvit", _maxvit_tiny, full=_m("maxvit_t"))
