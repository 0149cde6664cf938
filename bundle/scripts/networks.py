"""Networks: the QSMGAN generator (a 3D U-Net with a centre-crop head) and its WGAN-GP critic, in physical units.

The backbone is MONAI's :class:`~monai.networks.nets.BasicUNet` (per level 2 × [Conv3d 3×3×3 → BatchNorm →
LeakyReLU], four down-sampling levels); :class:`QSMGenerator` wraps it so that its input is a local field in
ppm and its output χ in ppm, cropped by ``margin`` voxels on every side (64³ → 48³), so that each output voxel
sees the non-local field around it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.nets import BasicUNet
from torch import nn

__all__ = [
    "CenterCrop3d",
    "QSMGenerator",
    "QSMCritic",
    "qsmgan_unet",
    "count_parameters",
    "bf16_supported",
    "resolve_autocast",
]


def bf16_supported(device: str | torch.device) -> bool:
    """Whether bfloat16 autocast is fast on ``device``: a CUDA GPU with bf16 support, or a CPU with AMX tiles or
    AVX512-BF16 (Intel Sapphire Rapids and later, AMD Zen 4 and later). Elsewhere, e.g. on AVX2-only CPUs, bf16
    convolutions are emulated and many times slower than float32."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        cpu = getattr(torch, "cpu", None)
        checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
        return any(bool(getattr(cpu, name, lambda: False)()) for name in checks)
    return False


def resolve_autocast(autocast: bool | str, device: str | torch.device) -> bool:
    """``autocast`` as a bool: ``True``/``False`` as given, ``"auto"`` = :func:`bf16_supported` on ``device``."""
    if isinstance(autocast, str):
        if autocast.lower() != "auto":
            raise ValueError(f"autocast must be true, false or 'auto', got {autocast!r}")
        return bf16_supported(device)
    return bool(autocast)


class CenterCrop3d(nn.Module):
    """Crop ``margin`` voxels from every side of the last three axes of a (B, C, X, Y, Z) tensor."""

    def __init__(self, margin: int) -> None:
        super().__init__()
        if margin < 0:
            raise ValueError(f"margin must be >= 0, got {margin}")
        self.margin = int(margin)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.margin
        if m == 0:
            return x
        if min(x.shape[-3:]) <= 2 * m:
            raise ValueError(f"input spatial shape {list(x.shape[-3:])} is too small for a crop margin of {m}")
        return x[..., m:-m, m:-m, m:-m]

    def extra_repr(self) -> str:
        return f"margin={self.margin}"


class QSMGenerator(nn.Module):
    """QSMGAN generator: local field (ppm) → χ (ppm), with a centre-crop head.

    Arguments:
        backbone: a fully convolutional 1-channel → 1-channel network; default the QSMGAN U-Net
            (BasicUNet, features ``(16, 32, 64, 128, 256, 16)``, LeakyReLU(0.1), BatchNorm).

    Keywords:
        margin: voxels cropped from every side of the output (8: 64³ → 48³).
        field_scale: the backbone sees ``field_ppm × field_scale``.
        chi_scale: the backbone predicts ``χ_ppm × chi_scale``; the output is linear (no tanh), so microbleeds of
            1–2 ppm are not capped.
        autocast: run the backbone under bfloat16 autocast: ``True``, ``False`` or ``"auto"`` (where
            :func:`bf16_supported` says it is fast for the input's device: GPUs, CPUs with AMX/AVX512-BF16); the
            output stays float32.
        channels_last: keep the convolution weights and activations in channels-last 3D memory order
            (``torch.channels_last_3d``): the same numbers (float32 rounding), about 2× faster float32 convolutions
            on CPU (oneDNN; ``bench/bench_inference.py``). Loading a state dict keeps the layout.

    Shapes:
        input (B, 1, X, Y, Z) with X, Y, Z multiples of 16 → output (B, 1, X − 2m, Y − 2m, Z − 2m).
    """

    def __init__(
        self,
        backbone: nn.Module | None = None,
        margin: int = 8,
        field_scale: float = 10.0,
        chi_scale: float = 10.0,
        autocast: bool | str = False,
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        self.backbone = backbone if backbone is not None else qsmgan_unet()
        self.crop = CenterCrop3d(margin)
        if field_scale <= 0 or chi_scale <= 0:
            raise ValueError(f"field_scale and chi_scale must be positive, got {field_scale}, {chi_scale}")
        self.field_scale = float(field_scale)
        self.chi_scale = float(chi_scale)
        resolve_autocast(autocast, "cpu")  # validates
        self.autocast = autocast
        self.channels_last = bool(channels_last)
        if self.channels_last:
            self.backbone.to(memory_format=torch.channels_last_3d)

    @property
    def margin(self) -> int:
        return self.crop.margin

    def forward(self, field: torch.Tensor) -> torch.Tensor:
        if field.ndim != 5 or field.shape[1] != 1:
            raise ValueError(f"expected a (B, 1, X, Y, Z) field, got shape {list(field.shape)}")
        x = field * self.field_scale
        if not torch.jit.is_scripting():  # TorchScript (ckpt_export) always runs in float32, default layout
            return self.crop(self._backbone_eager(x).float()) / self.chi_scale
        return self.crop(self.backbone(x).float()) / self.chi_scale

    @torch.jit.unused
    def _backbone_eager(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last_3d)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=resolve_autocast(self.autocast, x.device)):
            out = self.backbone(x)
        return out.contiguous() if self.channels_last else out


def qsmgan_unet(
    features: Sequence[int] = (16, 32, 64, 128, 256, 16), negative_slope: float = 0.1, norm: str = "batch"
) -> BasicUNet:
    """The QSMGAN U-Net backbone: 4 levels of 2 × [Conv3d 3³ → ``norm`` → LeakyReLU(``negative_slope``)]."""
    return BasicUNet(
        spatial_dims=3,
        in_channels=1,
        out_channels=1,
        features=tuple(features),
        act=("LeakyReLU", {"negative_slope": negative_slope, "inplace": True}),
        norm=norm,
    )


class QSMCritic(nn.Module):
    """WGAN-GP critic: four strided 3D convolution blocks and a final convolution to one score per sample.

    Each block is Conv3d(kernel 4, stride 2, padding 1) → [normalisation] → LeakyReLU(0.2), channels doubling per
    block; a 48³ χ patch becomes 3³ features, and a last Conv3d over the remaining extent gives one scalar. There is
    no BatchNorm: the gradient penalty is computed per sample, which batch statistics would couple.

    Keywords:
        channels: output channels of the first block (doubled in each of the four blocks).
        norm: ``"none"`` (default), ``"instance"`` or ``"layer"`` (GroupNorm with one group).
        conditional: also read the field's central crop as a second input channel.
        patch_size: edge of the χ patches it scores (48); must be divisible by 16.
        chi_scale, field_scale: the critic sees χ·chi_scale and field·field_scale (order-1 numbers).

    Shapes:
        chi (B, 1, P, P, P) ppm [, field (B, 1, P, P, P) ppm] → scores (B,).
    """

    def __init__(
        self,
        channels: int = 32,
        norm: str = "none",
        conditional: bool = False,
        patch_size: int = 48,
        chi_scale: float = 10.0,
        field_scale: float = 10.0,
    ) -> None:
        super().__init__()
        if norm not in ("none", "instance", "layer"):
            raise ValueError(f"norm must be 'none', 'instance' or 'layer' (never batch), got {norm!r}")
        if patch_size % 16 or patch_size < 16:
            raise ValueError(f"patch_size must be a positive multiple of 16, got {patch_size}")
        self.conditional = bool(conditional)
        self.chi_scale, self.field_scale = float(chi_scale), float(field_scale)
        layers: list[nn.Module] = []
        c_in = 2 if self.conditional else 1
        for i in range(4):
            c_out = channels * 2**i
            layers.append(nn.Conv3d(c_in, c_out, kernel_size=4, stride=2, padding=1))
            if norm == "instance":
                layers.append(nn.InstanceNorm3d(c_out, affine=True))
            elif norm == "layer":
                layers.append(nn.GroupNorm(1, c_out))
            layers.append(nn.LeakyReLU(0.2, inplace=True))
            c_in = c_out
        self.features = nn.Sequential(*layers)
        self.score = nn.Conv3d(c_in, 1, kernel_size=patch_size // 16)

    def forward(self, chi: torch.Tensor, field: torch.Tensor | None = None) -> torch.Tensor:
        x = chi * self.chi_scale
        if self.conditional:
            if field is None:
                raise ValueError("a conditional critic needs the field's central crop as second input")
            x = torch.cat([x, field * self.field_scale], dim=1)
        return self.score(self.features(x)).flatten(1).mean(1)


def count_parameters(module: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)
