"""Networks: the QSMGAN generator (a 3D U-Net with a centre-crop head) and its WGAN-GP critic, in physical units.

The backbone is MONAI's :class:`~monai.networks.nets.BasicUNet` (per level 2 × [Conv3d 3×3×3 → BatchNorm →
LeakyReLU], four down-sampling levels); :class:`QSMGenerator` wraps it so that its input is a local field in
ppm and its output χ in ppm, cropped by ``margin`` voxels on every side (64³ → 48³), so that each output voxel
sees the non-local field around it.

Optionally (``estimate="tkd"``) the generator also reads a whole-region k-space estimate of χ: before tiling, the
inferer calls :meth:`QSMGenerator.prepare_input` on the whole volume, which appends a TKD solution of the same
field as a second channel, so that every 64³ window carries the low-frequency information of the whole region
that a 64³ field patch alone cannot. With ``residual=True`` the backbone predicts a correction to that estimate;
with ``field_channel=False`` it reads the estimate alone (χ = estimate + backbone(estimate)).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from monai.networks.nets import BasicUNet
from monai.networks.nets.basic_unet import UpCat
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from .baselines import tkd
from .checks import as_bool

__all__ = [
    "CenterCrop3d",
    "QSMGenerator",
    "QSMCritic",
    "qsmgan_unet",
    "expand_input_channels",
    "fold_batchnorm",
    "cropped_unet_forward",
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
    """``autocast`` as a bool: ``True``/``False`` as given (also as the strings ``"true"``/``"false"`` that MONAI's
    command line passes on), ``"auto"`` = :func:`bf16_supported` on ``device``."""
    if isinstance(autocast, str):
        text = autocast.strip().lower()
        if text in ("true", "false"):
            return text == "true"
        if text != "auto":
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
        backbone: a fully convolutional network with ``1`` input channel (``estimate=None``, or the estimate alone)
            or ``2`` (field and estimate) and 1 output channel; default the QSMGAN U-Net (:func:`qsmgan_unet`:
            BasicUNet, LeakyReLU(0.1), BatchNorm) with ``features`` and the input channels it reads.

    Keywords:
        features: the default backbone's feature counts (BasicUNet's six).
        margin: voxels cropped from every side of the output (8: 64³ → 48³).
        field_scale: the backbone sees ``field_ppm × field_scale``.
        chi_scale: the backbone predicts ``χ_ppm × chi_scale`` (and sees an estimate channel as ``χ_ppm ×
            chi_scale``); the output is linear (no tanh), so microbleeds of 1–2 ppm are not capped.
        estimate: ``None`` (the QSMGAN reference: field only) or ``"tkd"``: a second input channel holding the
            truncated k-space division of the field over the whole region given to :meth:`prepare_input`.
        estimate_threshold: TKD threshold δ of the estimate.
        residual: predict χ as the estimate plus the backbone's output (needs ``estimate``).
        field_channel: the backbone reads the field (``True``); ``False`` (needs ``estimate``): it reads the estimate
            alone, the field reaching it only through the estimate.
        voxel_size: voxel size (mm) of the grid the network runs on (used by the estimate; ``None``, the input's own
            grid, only without one; ignored then).
        b0_direction: B0 direction on that grid, voxel coordinates (used by the estimate).
        autocast: run the backbone under bfloat16 autocast: ``True``, ``False`` or ``"auto"`` (where
            :func:`bf16_supported` says it is fast for the input's device: GPUs, CPUs with AMX/AVX512-BF16); the
            output stays float32.
        channels_last: keep the convolution weights and activations in channels-last 3D memory order
            (``torch.channels_last_3d``): the same numbers (float32 rounding), faster float32 convolutions on CPU
            (oneDNN). Loading a state dict keeps the layout.

    Shapes:
        input (B, C, X, Y, Z) with X, Y, Z multiples of 16, C = 1 (field; with an estimate, the estimate is then
        computed on the patch itself, a fallback: whole volumes go through :meth:`prepare_input`) or C = 2 (field,
        estimate) → output (B, 1, X − 2m, Y − 2m, Z − 2m). The input channels are the same with
        ``field_channel=False``: the backbone then drops the field.
    """

    def __init__(
        self,
        backbone: nn.Module | None = None,
        features: Sequence[int] = (16, 32, 64, 128, 256, 16),
        margin: int = 8,
        field_scale: float = 10.0,
        chi_scale: float = 10.0,
        estimate: str | None = None,
        estimate_threshold: float = 0.19,
        residual: bool = False,
        field_channel: bool = True,
        voxel_size: Sequence[float] | None = (1.0, 1.0, 1.0),
        b0_direction: Sequence[float] = (0.0, 0.0, 1.0),
        autocast: bool | str = False,
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        if estimate not in ESTIMATES:
            raise ValueError(f"estimate must be one of {ESTIMATES}, got {estimate!r}")
        residual = as_bool(residual, "residual")
        field_channel = as_bool(field_channel, "field_channel")  # "false" from the command line is a string
        if residual and estimate is None:
            raise ValueError("residual=True needs an estimate to add the backbone's output to")
        if not field_channel and estimate is None:
            raise ValueError("field_channel=False needs an estimate for the backbone to read")
        self.in_channels = 1 if estimate is None else 2  # channels of the prepared input (field, estimate)
        self.field_channel = field_channel
        backbone_channels = self.in_channels if self.field_channel else 1
        self.backbone = backbone if backbone is not None else qsmgan_unet(features, in_channels=backbone_channels)
        self.crop = CenterCrop3d(margin)
        if field_scale <= 0 or chi_scale <= 0:
            raise ValueError(f"field_scale and chi_scale must be positive, got {field_scale}, {chi_scale}")
        self.field_scale = float(field_scale)
        self.chi_scale = float(chi_scale)
        self.estimate = estimate
        self.estimate_threshold = float(estimate_threshold)
        self.residual = residual
        self.voxel_size = None  # only the estimate needs the grid (a field-only network is scale free)
        if estimate is not None:
            if voxel_size is None or isinstance(voxel_size, str) or len(voxel_size) != 3:
                raise ValueError(f"an estimate needs the voxel size (mm) of the network's grid, got {voxel_size!r}")
            self.voxel_size = tuple(float(v) for v in voxel_size)
        self.b0_direction = tuple(float(v) for v in b0_direction)
        resolve_autocast(autocast, "cpu")  # validates
        self.autocast = autocast
        self.channels_last = as_bool(channels_last, "channels_last")
        if self.channels_last:
            self.backbone.to(memory_format=torch.channels_last_3d)

    @property
    def margin(self) -> int:
        return self.crop.margin

    @torch.jit.unused
    def prepare_input(self, field: torch.Tensor) -> torch.Tensor:
        """The network's input channels for a whole region: (B, 1, X, Y, Z) field (ppm) → (B, C, X, Y, Z).

        With an estimate, channel 1 is the TKD solution (ppm) of each field over the region where it is non-zero
        (the mask: outside it the field is zero), computed with zero padding on ``voxel_size``/``b0_direction``.
        Without one the field is returned as it is.
        """
        if field.ndim != 5 or field.shape[1] != 1:
            raise ValueError(f"expected a (B, 1, X, Y, Z) field, got shape {list(field.shape)}")
        if self.estimate is None:
            return field
        raw = field.as_tensor() if hasattr(field, "as_tensor") else field
        chis = []
        for b in raw[:, 0]:
            support = b != 0
            chis.append(
                tkd(b, support, self.voxel_size, self.b0_direction, self.estimate_threshold)
                if bool(support.any())
                else torch.zeros_like(b)
            )
        return torch.cat([raw, torch.stack(chis)[:, None].to(raw.dtype)], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 5 or (x.shape[1] != 1 and x.shape[1] != self.in_channels):
            raise ValueError(f"expected a (B, {self.in_channels}, X, Y, Z) input, got shape {list(x.shape)}")
        if isinstance(self.backbone, BasicUNet) and (x.shape[2] % 16 or x.shape[3] % 16 or x.shape[4] % 16):
            raise ValueError(f"spatial sizes must be multiples of 16 (four 2× poolings), got {list(x.shape[2:])}")
        if x.shape[1] != self.in_channels:  # a bare field patch: estimate on the patch (see Shapes)
            if torch.jit.is_scripting():
                raise ValueError("a TorchScript generator needs its estimate channel in the input (prepare_input)")
            else:
                x = self.prepare_input(x)
        if self.in_channels == 1:
            scaled = x * self.field_scale
        elif self.field_channel:
            scaled = torch.cat([x[:, :1] * self.field_scale, x[:, 1:] * self.chi_scale], dim=1)
        else:
            scaled = x[:, 1:] * self.chi_scale
        if not torch.jit.is_scripting():  # TorchScript (ckpt_export) always runs in float32, default layout
            out = self._backbone_eager(scaled).float() / self.chi_scale
        else:
            out = self.crop(self.backbone(scaled).float()) / self.chi_scale
        if self.residual:
            out = out + self.crop(x[:, 1:2])
        return out

    @torch.jit.unused
    def _backbone_eager(self, x: torch.Tensor) -> torch.Tensor:
        """The backbone's output, cropped by the margin. In eval mode a BasicUNet's finest decoder levels only
        compute what the crop keeps (:func:`cropped_unet_forward`: the same map, about a third less work)."""
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last_3d)
        exporting = torch.onnx.is_in_onnx_export() or torch.compiler.is_exporting()  # exported graphs stay float32
        enabled = resolve_autocast(self.autocast, x.device) and not exporting
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=enabled):
            if not self.training and isinstance(self.backbone, BasicUNet):
                out = cropped_unet_forward(self.backbone, x, self.margin)
            else:
                out = self.crop(self.backbone(x))
        return out.contiguous()


#: Whole-region χ estimates the generator can read as a second channel.
ESTIMATES = (None, "tkd")


def expand_input_channels(state: dict[str, torch.Tensor], in_channels: int) -> dict[str, torch.Tensor]:
    """A generator state dict with its first convolution widened to ``in_channels`` inputs, new ones zero.

    Starting an estimate-reading generator (``estimate="tkd"``) from a field-only one this way gives a network that
    initially computes exactly what the field-only one did, and learns to use the new channel from there.
    """
    convs = [k for k, v in state.items() if k.endswith(".weight") and v.ndim == 5]
    if not convs:
        raise ValueError("the state dict has no 3D convolution weight")
    first = convs[0]
    w = state[first]
    if w.shape[1] > in_channels:
        raise ValueError(f"{first} already has {w.shape[1]} input channels (> {in_channels})")
    out = dict(state)
    out[first] = torch.cat([w, w.new_zeros((w.shape[0], in_channels - w.shape[1], *w.shape[2:]))], dim=1)
    return out


def qsmgan_unet(
    features: Sequence[int] = (16, 32, 64, 128, 256, 16),
    negative_slope: float = 0.1,
    norm: str = "batch",
    in_channels: int = 1,
) -> BasicUNet:
    """The QSMGAN U-Net backbone: 4 levels of 2 × [Conv3d 3³ → ``norm`` → LeakyReLU(``negative_slope``)].

    Its inputs are multiples of 16 (:class:`QSMGenerator` checks), so the decoder's skip connections always match
    and BasicUNet's replicate padding of odd sizes (a zero-width pad that still copied every up-sampled activation)
    is switched off: bf16 windows 1.6× faster on an Intel Xeon with AMX-BF16, float32 unchanged
    (``bench/bench_window.py``, model card "Speed").
    """
    net = BasicUNet(
        spatial_dims=3,
        in_channels=int(in_channels),
        out_channels=1,
        features=tuple(features),
        act=("LeakyReLU", {"negative_slope": negative_slope, "inplace": True}),
        norm=norm,
    )
    for module in net.modules():
        if isinstance(module, UpCat):
            module.is_pad = False
    return net


def fold_batchnorm(network: nn.Module) -> nn.Module:
    """An inference copy of ``network`` (in eval mode) with every BatchNorm that directly follows a convolution
    folded into that convolution's weights and bias (MONAI's ``Convolution`` blocks: ``conv`` then ``adn`` with the
    norm ``N`` first). The same function to float32 rounding, one pass over the activations less per block (bf16
    windows a further 1.2× faster on an Intel Xeon with AMX-BF16, float32 unchanged: ``bench/bench_window.py``).
    The original is not modified; its memory format (channels-last) is kept.

    Raises:
        ValueError: the network is in training mode (BatchNorm then uses batch statistics, which do not fold).
    """
    if network.training:
        raise ValueError("fold_batchnorm needs a network in eval mode: BatchNorm's running statistics are folded")
    folded = copy.deepcopy(network)
    for module in folded.modules():
        conv, adn = getattr(module, "conv", None), getattr(module, "adn", None)
        if not isinstance(conv, nn.Conv3d) or not isinstance(adn, nn.Sequential) or len(adn) == 0:
            continue
        first, norm = next(adn.named_children())
        if first != "N" or not isinstance(norm, nn.modules.batchnorm._BatchNorm):
            continue  # not conv → norm: nothing to fold
        channels_last = conv.weight.is_contiguous(memory_format=torch.channels_last_3d)
        fused = fuse_conv_bn_eval(conv, norm)
        if channels_last:
            fused = fused.to(memory_format=torch.channels_last_3d)
        module.conv = fused
        adn.N = nn.Identity()
    return folded


#: Layers that act on each voxel alone in eval mode: a convolution followed by these can be computed on any part of
#: its input (a crop) and gives the same values there.
_POINTWISE_IN_EVAL = (nn.Identity, nn.Dropout, nn.LeakyReLU, nn.ReLU, nn.PReLU, nn.modules.batchnorm._BatchNorm)


def _decoder_plan(unet: BasicUNet, spatial: Sequence[int], margin: int) -> list[list[tuple[int, int]]] | None:
    """The output ranges (per axis, [lo, hi)) that the finest decoder levels of ``unet`` must compute so that the
    final convolution's output is known on [margin, n − margin); ``None`` where no level can be cropped.

    Entry ``l`` (0 = the finest level, ``upcat_1``) is the range of that level's output on its own grid. Each
    decoder level's two 3×3×3 convolutions need two voxels more per side of their input, and its 2× transposed
    convolution (kernel 2, stride 2) maps input voxel ``i`` to output voxels ``2i`` and ``2i + 1``. A level is
    cropped only while its input range lies inside the level's grid, so that valid convolutions on it reproduce
    the zero-padded ones exactly; coarser levels run whole (in a 64³ window with margin 8, ``upcat_1`` computes
    52³ → 48³ instead of 64³ and ``upcat_2`` 30³ → 26³ instead of 32³).
    """
    if any(n % 16 for n in spatial):  # odd sizes on a coarse level: BasicUNet's own padding of the skips applies
        return None
    levels = [unet.upcat_1, unet.upcat_2, unet.upcat_3, unet.upcat_4]
    need = [(margin, n - margin) for n in spatial]
    plan = []
    for depth, level in enumerate(levels):
        size = [n >> depth for n in spatial]
        wanted = [(lo - 2, hi + 2) for lo, hi in need]  # the input of the level's two convolutions
        if not _croppable(level) or any(lo < 0 or hi > n for (lo, hi), n in zip(wanted, size)):
            break
        plan.append(need)
        need = [(lo // 2, -(-hi // 2)) for lo, hi in wanted]  # the coarser level's output the up-sampling needs
    return plan or None


def _croppable(level: nn.Module) -> bool:
    """Whether a decoder level is 2 × [Conv3d 3³ (stride 1, padding 1) → voxel-wise layers] after a transposed
    convolution with kernel 2 and stride 2 (BasicUNet's default ``deconv`` up-sampling), in eval mode."""
    deconv = getattr(getattr(level, "upsample", None), "deconv", None)
    if not isinstance(deconv, nn.ConvTranspose3d) or deconv.kernel_size != (2, 2, 2) or deconv.stride != (2, 2, 2):
        return False
    if deconv.padding != (0, 0, 0) or deconv.output_padding != (0, 0, 0) or len(level.upsample) != 1:
        return False
    blocks = list(getattr(level, "convs", nn.Sequential()).children())
    if len(blocks) != 2:
        return False
    for block in blocks:
        conv, adn = getattr(block, "conv", None), getattr(block, "adn", None)
        if not isinstance(conv, nn.Conv3d) or not isinstance(adn, nn.Sequential) or len(list(block.children())) != 2:
            return False
        if conv.kernel_size != (3, 3, 3) or conv.stride != (1, 1, 1) or conv.padding != (1, 1, 1):
            return False
        if conv.dilation != (1, 1, 1) or conv.groups != 1 or conv.padding_mode != "zeros" or block.training:
            return False
        if not all(isinstance(layer, _POINTWISE_IN_EVAL) for layer in adn.children()):
            return False
    return True


def cropped_unet_forward(unet: BasicUNet, x: torch.Tensor, margin: int) -> torch.Tensor:
    """``BasicUNet(x)`` cropped by ``margin`` voxels per side, computing the finest decoder levels only where the
    crop needs them (:func:`_decoder_plan`): valid convolutions on the needed part of their input give exactly the
    values the zero-padded convolutions give there (float rounding aside). The generator's finest level is 47 % of
    a 64³ window's time (bf16, AMD EPYC); the crop keeps 42 % of its output. Eval mode only: BatchNorm with batch
    statistics (training) or instance norms would see other voxels. Falls back to the whole forward and a crop.

    Shapes: (B, C, X, Y, Z), sizes multiples of 16 → (B, out_channels, X − 2·margin, Y − 2·margin, Z − 2·margin).
    """
    spatial = tuple(x.shape[2:])
    plan = _decoder_plan(unet, spatial, margin) if margin > 0 and not unet.training else None
    if plan is None:
        m = margin
        return unet(x)[..., m : spatial[0] - m, m : spatial[1] - m, m : spatial[2] - m]
    skips = [unet.conv_0(x)]  # the encoder, whole: x0 … x3 feed the decoder levels 1 … 4
    for down in (unet.down_1, unet.down_2, unet.down_3):
        skips.append(down(skips[-1]))
    u = unet.down_4(skips[-1])
    levels = [unet.upcat_1, unet.upcat_2, unet.upcat_3, unet.upcat_4]
    start = [0, 0, 0]  # where u's computed part starts on its level's grid
    for depth in range(3, -1, -1):
        level, skip = levels[depth], skips[depth]
        if depth >= len(plan):  # a coarse level: whole, as BasicUNet runs it
            u = level(u, skip)
            continue
        need = plan[depth]
        wanted = [(lo - 2, hi + 2) for lo, hi in need]
        # up-sample the coarser level's part that covers `wanted`, then cut it to `wanted`
        parent = tuple(slice(lo // 2 - s, -(-hi // 2) - s) for (lo, hi), s in zip(wanted, start))
        up = level.upsample(u[(..., *parent)])
        cut = tuple(slice(lo - 2 * (lo // 2), lo - 2 * (lo // 2) + hi - lo) for lo, hi in wanted)
        inputs = torch.cat([skip[(..., *(slice(lo, hi) for lo, hi in wanted))], up[(..., *cut)]], dim=1)
        for block in level.convs.children():
            inputs = block.adn(nn.functional.conv3d(inputs, block.conv.weight, block.conv.bias))
        u, start = inputs, [lo for lo, _ in need]
    return unet.final_conv(u)


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
