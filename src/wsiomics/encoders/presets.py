"""Named encoder presets: the architecture, weights location, input transform and precision of each.

Pathology foundation models are timm architectures with non-default constructor arguments (LayerScale,
register tokens, SwiGLU MLPs) and their own normalisation; getting one of those wrong still produces
features, just meaningless ones. A preset pins all of it in one place, so that ``encoder: uni`` means the
same network whether its weights come from the hub, from a local checkpoint on an offline cluster, or
are random for the demo. Architectures follow the model cards (UNI, UNI2-h, Prov-GigaPath, Virchow2,
H-optimus-0) and CLAM's truncated ResNet-50.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class EncoderPreset:
    """Everything needed to build an encoder and feed it tiles.

    ``arch``/``kwargs`` go to ``timm.create_model``; string values of ``layer_kwargs`` name timm layer
    classes (kept as names so presets stay plain data). ``pooling`` turns the network output into one
    vector per tile: ``"model"`` (the network already pools), ``"cls_mean"`` (class token concatenated
    with the mean of the patch tokens, Virchow's recipe) . ``truncate_after`` cuts a ResNet after that
    stage (CLAM keeps layer3: 1024-d at stride 16). ``hub`` is where ``pretrained: true`` fetches
    weights from; ``cuda_precision`` is the autocast dtype used on CUDA.
    """

    name: str
    arch: str
    feature_dim: int
    hub: str | None
    input_size: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bilinear"
    kwargs: dict[str, Any] = field(default_factory=dict)
    layer_kwargs: dict[str, str] = field(default_factory=dict)
    pooling: str = "model"
    truncate_after: str | None = None
    cuda_precision: str = "bf16"
    description: str = ""


_VIT = {"num_classes": 0, "img_size": 224}

PRESETS: dict[str, EncoderPreset] = {
    p.name: p
    for p in (
        EncoderPreset(
            name="resnet50_trunc", arch="resnet50", feature_dim=1024, hub="timm/resnet50.tv_in1k",
            kwargs={"num_classes": 0}, truncate_after="layer3", cuda_precision="fp16",
            description="ImageNet ResNet-50 cut after layer 3 and average-pooled (the CLAM convention)",
        ),
        EncoderPreset(
            name="vit_small", arch="vit_small_patch16_224", feature_dim=384,
            hub="timm/vit_small_patch16_224.augreg_in21k_ft_in1k", mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
            interpolation="bicubic", kwargs=dict(_VIT),
            description="ViT-S/16, ImageNet-21k augreg weights",
        ),
        EncoderPreset(
            name="uni", arch="vit_large_patch16_224", feature_dim=1024, hub="MahmoodLab/UNI",
            interpolation="bicubic", kwargs={**_VIT, "patch_size": 16, "init_values": 1e-5, "dynamic_img_size": True},
            description="UNI (ViT-L/16, Mahmood lab)",
        ),
        EncoderPreset(
            name="uni2_h", arch="vit_giant_patch14_224", feature_dim=1536, hub="MahmoodLab/UNI2-h",
            interpolation="bicubic",
            kwargs={**_VIT, "patch_size": 14, "depth": 24, "num_heads": 24, "init_values": 1e-5, "embed_dim": 1536,
                    "mlp_ratio": 2.66667 * 2, "no_embed_class": True, "reg_tokens": 8, "dynamic_img_size": True},
            layer_kwargs={"mlp_layer": "SwiGLUPacked", "act_layer": "SiLU"},
            description="UNI2-h (ViT-H/14 with SwiGLU and 8 register tokens, Mahmood lab)",
        ),
        EncoderPreset(
            name="gigapath", arch="vit_giant_patch14_dinov2", feature_dim=1536, hub="prov-gigapath/prov-gigapath",
            interpolation="bicubic",
            kwargs={**_VIT, "in_chans": 3, "patch_size": 16, "embed_dim": 1536, "depth": 40, "num_heads": 24,
                    "init_values": 1e-5, "mlp_ratio": 5.33334, "global_pool": "token"},
            description="Prov-GigaPath tile encoder (ViT-g/16, DINOv2)",
        ),
        EncoderPreset(
            name="virchow2", arch="vit_huge_patch14_224", feature_dim=2560, hub="paige-ai/Virchow2",
            interpolation="bicubic",
            kwargs={**_VIT, "init_values": 1e-5, "mlp_ratio": 5.3375, "global_pool": "", "dynamic_img_size": True,
                    "reg_tokens": 4},
            layer_kwargs={"mlp_layer": "SwiGLUPacked", "act_layer": "SiLU"}, pooling="cls_mean",
            cuda_precision="fp16",
            description="Virchow2 (ViT-H/14, 4 register tokens; class token + mean patch token, 2560-d)",
        ),
        EncoderPreset(
            name="hoptimus0", arch="vit_giant_patch14_reg4_dinov2", feature_dim=1536, hub="bioptimus/H-optimus-0",
            mean=(0.707223, 0.578729, 0.703617), std=(0.211883, 0.230117, 0.177517), interpolation="bicubic",
            kwargs={**_VIT, "init_values": 1e-5, "dynamic_img_size": False, "global_pool": "token"},
            cuda_precision="fp16",
            description="H-optimus-0 (ViT-g/14 with 4 register tokens, Bioptimus)",
        ),
    )
}
