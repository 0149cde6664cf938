"""Training and validation data: the on-the-fly synthetic engine, simulated whole volumes and user datalists.

* :class:`SyntheticPatchStream` — an endless, seeded stream of (64³ field patch, 48³ χ target) pairs simulated
  from physics on the training device; the default training source.
* :class:`SimulatedVolumes` — a fixed, seeded set of whole simulated cases (field, χ, mask, affine) for
  validation and for the inference demo.
* :func:`training_loader` — picks the synthetic stream, or a user datalist of NIfTI field/χ/mask files
  read and patch-sampled by MONAI transforms.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch
from monai.data import DataLoader, Dataset, MetaTensor, load_decathlon_datalist
from monai.transforms import Compose
from torch.utils.data import IterableDataset, get_worker_info

from .physics import demean_in_mask, forward_field

__all__ = [
    "SyntheticPatchStream",
    "SimulatedVolumes",
    "simulate_case",
    "training_loader",
    "ellipsoid_mask",
    "validation_dataset",
    "scanner_affine",
]

#: ``phantom(shape, voxel_size, generator=, device=)`` → χ (ppm), ``{"chi": χ, "mask": mask}``, or
#: ``{"chi": χ, "mask": mask, "field": local field}`` (a precomputed, already noisy field: see SyntheticPatchStream)
Phantom = Callable[..., torch.Tensor | Mapping[str, torch.Tensor]]

#: A large odd multiplier that separates the random streams of different seeds and ranks.
_STREAM_STRIDE = 1_000_003


def _rank_and_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def ellipsoid_mask(
    shape: Sequence[int],
    voxel_size: Sequence[float],
    gen: torch.Generator,
    fill: tuple[float, float] = (0.7, 0.95),
    extent_scale: float = 1.0,
    shift: Sequence[float] = (0.0, 0.0, 0.0),
) -> torch.Tensor:
    """A random, slightly rotated ellipsoidal 'head' mask (bool, X×Y×Z).

    The ellipsoid's semi-axes are ``fill`` (drawn uniformly in the range) × ``extent_scale`` × half the grid
    extent; its centre is moved by ``shift`` (mm) from the grid centre.
    """
    from .phantoms.random_sources import random_rotation

    extent = torch.tensor([n * v for n, v in zip(shape, voxel_size)], dtype=torch.float32)
    semi = extent_scale * extent / 2 * (fill[0] + (fill[1] - fill[0]) * torch.rand(3, generator=gen))
    axes = [
        (torch.arange(n, dtype=torch.float32) + 0.5) * v - e / 2 - float(s)
        for n, v, e, s in zip(shape, voxel_size, extent, shift)
    ]
    grid = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)
    tilt = (random_rotation(gen) * 0.1 + torch.eye(3, dtype=torch.float64) * 0.9).float()
    return ((grid @ tilt) / semi).square().sum(-1) <= 1.0


class SyntheticPatchStream(IterableDataset):
    """Endless stream of simulated training pairs: a ``patch_size``³ local field and the central χ crop.

    Each sample draws a χ map from one of ``phantoms`` (chosen with ``weights``) on a region ``context`` voxels
    larger than the patch on every side, so that the field inside the patch also carries the non-local
    contribution of sources outside it. The field is simulated with zero padding (no wrap-around), restricted to
    a mask (with probability ``mask_prob`` a random ellipsoid whose border crosses the patch, else the whole
    region; χ is zero outside it, as after background-field removal) and demeaned inside it, then Gaussian noise
    at a random SNR is added and random flips of each axis are applied to field and χ together (valid because D
    is even in every k component when B0 lies along a voxel axis; with an oblique B0 only the axes that leave D
    unchanged are flipped).

    Sample ``i`` of the stream depends only on ``(seed, i)``, so the stream is reproducible and independent of the
    batch size; several DataLoader workers or DDP ranks take disjoint samples.

    A phantom may also return its own field, ``{"chi": χ, "mask": mask, "field": field}`` on the region (e.g.
    :class:`scripts.phantoms.RealisticHeadPatchPhantom`: a whole head's total field, noisy, after background field
    removal, with the removal's mask). That field is used as given: no forward model, no random mask border and no
    noise (it carries its own); the field-only input is its patch demeaned inside the mask (zero outside), the
    ``prepare`` channels are computed from the region's field as given. The target is the phantom's (true) χ inside
    the mask and zero outside, as for every sample (the loss compares the whole target cube, validation only the
    mask): inside the mask the network learns the true χ behind a background-removed field. Flips apply as to every
    sample.

    Keywords:
        phantoms: phantom generators (see :mod:`scripts.phantoms`); default one :class:`RandomSourcePhantom`. A
            phantom may return ``{"chi": χ, "mask": mask}``: the field is then that of χ inside its mask, zero
            outside and demeaned inside, as a brain's local field is; with a ``"field"`` too, that field (above).
            A phantom with a ``b0_direction`` attribute must simulate the stream's B0 direction.
        weights: relative frequency of each phantom.
        patch_size: input patch edge in voxels (64 in QSMGAN).
        margin: crop margin; the target is the central ``patch_size − 2·margin`` cube (48³ for margin 8).
        context: extra simulated voxels on every side of the patch.
        voxel_size: mm.
        b0_direction: voxel coordinates.
        snr: (min, max) ratio of the field's RMS inside the mask to the noise σ, drawn log-uniformly.
        mask_prob: probability of a random ellipsoidal mask border inside the patch.
        flip_prob: probability of flipping each axis.
        pad: zero padding of the simulated region before the FFT, as a fraction per side (see ``forward_field``).
        batch_size: samples per yielded batch (the stream yields stacked batches: use ``DataLoader(batch_size=None)``).
        seed: stream seed.
        device: where fields are simulated ("cuda" when training on GPU).
        prepare: the generator's :meth:`~scripts.networks.QSMGenerator.prepare_input` when it reads whole-region
            channels (an estimate of χ): noise is then added to the whole region's field, the channels are computed
            over the region (as inference computes them over the whole volume) and cropped to the patch. ``None``:
            the field patch only.
        patch_schedule: a patch-size curriculum, ``[[first batch, patch edge], ...]`` with increasing first
            batches: from that batch of the stream on, samples have that patch edge (a multiple of 16 above
            ``2·margin``, so the U-Net's four poolings fit; the target stays the central crop inside ``margin``).
            Batches before the first entry use ``patch_size``. Batches are counted over the whole stream: one per
            iteration in a single process, ``world size × workers`` per iteration otherwise. Small patches are
            cheaper per step but see less of the field's non-local context; end on ``patch_size``, the size
            inference tiles with. ``None``: always ``patch_size``.
    """

    def __init__(
        self,
        phantoms: Sequence[Phantom] | None = None,
        weights: Sequence[float] | None = None,
        patch_size: int = 64,
        margin: int = 8,
        context: int = 16,
        voxel_size: Sequence[float] = (1.0, 1.0, 1.0),
        b0_direction: Sequence[float] = (0.0, 0.0, 1.0),
        snr: Sequence[float] = (5.0, 100.0),
        mask_prob: float = 0.3,
        flip_prob: float = 0.5,
        pad: float = 0.5,
        batch_size: int = 2,
        seed: int = 0,
        device: str | torch.device = "cpu",
        prepare: Callable[[torch.Tensor], torch.Tensor] | None = None,
        patch_schedule: Sequence[Sequence[int]] | None = None,
    ) -> None:
        super().__init__()
        from .phantoms import RandomSourcePhantom

        self.prepare = prepare
        self.phantoms = list(phantoms) if phantoms else [RandomSourcePhantom()]
        w = [1.0] * len(self.phantoms) if weights is None else [float(x) for x in weights]
        if len(w) != len(self.phantoms) or min(w) < 0 or sum(w) <= 0:
            raise ValueError(f"weights must be {len(self.phantoms)} non-negative numbers with a positive sum, got {w}")
        self.weights = torch.tensor(w, dtype=torch.float64)
        if patch_size <= 2 * margin:
            raise ValueError(f"patch_size ({patch_size}) must exceed 2 * margin ({2 * margin})")
        if snr[0] <= 0 or snr[1] < snr[0]:
            raise ValueError(f"snr must be (min, max) with 0 < min <= max, got {snr!r}")
        self.patch_size, self.margin, self.context = int(patch_size), int(margin), int(context)
        self.patch_schedule = self._check_schedule(patch_schedule)
        self.voxel_size = tuple(float(v) for v in voxel_size)
        self.b0_direction = tuple(float(v) for v in b0_direction)
        # flipping axis i maps D(k; b) to D(k; b with b_i negated): valid iff that is the same kernel
        b = self.b0_direction
        self.flip_axes = [i for i in range(3) if b[i] == 0 or all(b[j] == 0 for j in range(3) if j != i)]
        for phantom in self.phantoms:  # phantoms that simulate their own field must use the stream's B0 direction
            own = getattr(phantom, "b0_direction", None)
            if own is not None:
                own = torch.tensor([float(v) for v in own], dtype=torch.float64)
                mine = torch.tensor(b, dtype=torch.float64)
                if not torch.allclose(own / own.norm(), mine / mine.norm(), atol=1e-9):
                    raise ValueError(
                        f"{type(phantom).__name__} simulates B0 along {tuple(own.tolist())}, the stream along {b}"
                    )
        self.snr = (float(snr[0]), float(snr[1]))
        self.mask_prob, self.flip_prob, self.pad = float(mask_prob), float(flip_prob), float(pad)
        self.batch_size, self.seed = int(batch_size), int(seed)
        self.device = torch.device(device)
        self.start = 0  # index of the first sample; set on resume so that the stream does not repeat

    def _check_schedule(self, schedule: Sequence[Sequence[int]] | None) -> tuple[tuple[int, int], ...]:
        if schedule is None:
            return ()
        pairs = []
        for entry in schedule:
            if len(entry) != 2 or int(entry[0]) != entry[0] or int(entry[1]) != entry[1]:
                raise ValueError(f"patch_schedule entries must be [first batch, patch edge] integers, got {entry!r}")
            first, edge = int(entry[0]), int(entry[1])
            if first < 0 or (pairs and first <= pairs[-1][0]):
                raise ValueError(
                    f"patch_schedule's first batches must be non-negative and increasing, got {schedule!r}"
                )
            if edge <= 2 * self.margin or edge % 16:
                raise ValueError(
                    f"patch_schedule's patch edges must be multiples of 16 above 2 * margin ({2 * self.margin}), "
                    f"got {edge}"
                )
            pairs.append((first, edge))
        return tuple(pairs)

    def patch_size_at(self, batch: int) -> int:
        """Patch edge (voxels) of the stream's batch number ``batch`` under ``patch_schedule``."""
        edge = self.patch_size
        for first, size in self.patch_schedule:
            if batch >= first:
                edge = size
        return edge

    def sample(self, index: int) -> dict[str, torch.Tensor]:
        """Simulate sample ``index``: ``{"image": (K, P, P, P) field ppm (and estimate channels), "label": (1, C, C, C)
        χ ppm, "mask": (1, C, C, C) the field's mask on the target (1 inside, 0 outside)}`` with ``P`` the
        patch edge of the sample's batch (``index // batch_size``, see ``patch_schedule``) and ``C = P − 2·margin``."""
        gen = torch.Generator().manual_seed(self.seed * _STREAM_STRIDE + index)
        p = self.patch_size_at(index // self.batch_size)
        size = p + 2 * self.context
        shape = (size, size, size)
        phantom = self.phantoms[int(torch.multinomial(self.weights, 1, generator=gen))]
        chi = phantom(shape, self.voxel_size, generator=gen, device=self.device)
        mask = torch.ones(shape, dtype=torch.bool, device=self.device)
        given = None  # a field that the phantom computed itself (already noisy): used as it is
        if isinstance(chi, Mapping):  # a phantom with its own mask (e.g. a brain): the field is masked by it
            given = chi.get("field")
            chi, mask = chi["chi"], chi["mask"].to(device=self.device, dtype=torch.bool)
        chi = chi.float()
        if given is None:
            if torch.rand(1, generator=gen).item() < self.mask_prob:
                mask = mask & self._patch_mask(shape, gen).to(self.device)
        elif tuple(given.shape) != shape or tuple(chi.shape) != shape or tuple(mask.shape) != shape:
            raise ValueError(f"a phantom's field, χ and mask must have the region's shape {shape}")
        chi = chi * mask
        if given is None:
            field = forward_field(chi, self.voxel_size, self.b0_direction, mask=mask, pad=self.pad)
        else:
            field = given.to(device=self.device, dtype=torch.float32) * mask
        c = self.context
        inner = (slice(c, c + p),) * 3
        if self.prepare is None:  # field-only input: the patch's field, demeaned in its mask, noise on the patch
            field, chi, mask = field[inner], chi[inner], mask[inner]
            field = demean_in_mask(field, mask)
            field = (field if given is not None else self._add_noise(field, mask, gen))[None]
        else:  # whole-region channels: noise on the region's field, then the channels over the region, then crop
            field = field if given is not None else self._add_noise(field, mask, gen)
            field = self.prepare(field[None, None])[0][(slice(None), *inner)]
            chi, mask = chi[inner], mask[inner]
        for axis in self.flip_axes:
            if torch.rand(1, generator=gen).item() < self.flip_prob:
                field, chi, mask = field.flip(axis + 1), chi.flip(axis), mask.flip(axis)
        m = self.margin
        crop = (slice(m, p - m),) * 3
        return {
            "image": field.contiguous(),
            "label": chi[None][(slice(None), *crop)].contiguous(),
            "mask": mask[None][(slice(None), *crop)].float().contiguous(),
        }

    def _add_noise(self, field: torch.Tensor, mask: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """Gaussian noise at a log-uniform SNR in ``snr`` (σ = RMS of the field in the mask / SNR), zero outside."""
        rms = field[mask].square().mean().sqrt() if bool(mask.any()) else field.new_zeros(())
        log_snr = math.log(self.snr[0]) + torch.rand(1, generator=gen).item() * math.log(self.snr[1] / self.snr[0])
        noise = torch.randn(field.shape, generator=gen).to(self.device)
        return (field + noise * (rms / math.exp(log_snr))) * mask

    def _patch_mask(self, shape, gen) -> torch.Tensor:
        # an ellipsoid about twice the region, shifted along a random direction so that its border crosses
        # the central patch
        direction = torch.randn(3, generator=gen)
        distance = 0.45 + 0.45 * torch.rand(1, generator=gen).item()
        shift = [float(d) * distance * n * v for d, n, v in zip(direction / direction.norm(), shape, self.voxel_size)]
        return ellipsoid_mask(shape, self.voxel_size, gen, fill=(0.7, 0.9), extent_scale=2.0, shift=shift)

    def __iter__(self):
        rank, world = _rank_and_world()
        worker = get_worker_info()
        wid, nworkers = (worker.id, worker.num_workers) if worker is not None else (0, 1)
        stride, lane = world * nworkers, rank * nworkers + wid
        batch = self.start // self.batch_size
        while True:
            first = (batch * stride + lane) * self.batch_size
            samples = [self.sample(first + j) for j in range(self.batch_size)]  # one batch: one patch edge
            yield {k: torch.stack([s[k] for s in samples]) for k in samples[0]}
            batch += 1


def scanner_affine(
    shape: Sequence[int], voxel_size: Sequence[float], b0_direction: Sequence[float] = (0.0, 0.0, 1.0)
) -> torch.Tensor:
    """Voxel→world affine (mm) of a grid centred on the origin whose B0 direction is ``b0_direction``.

    The rotation is the smallest one taking the voxel-frame direction b̂ onto world (scanner) z, so that
    :func:`scripts.physics.b0_direction_from_affine` gives b̂ back; for b̂ = (0, 0, 1) the affine is diagonal.
    """
    b = torch.tensor([float(v) for v in b0_direction], dtype=torch.float64)
    b = b / b.norm()
    z = torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)
    v, c = torch.linalg.cross(b, z), float(b @ z)
    if c < -1 + 1e-12:  # B0 along -k: a half turn about x
        rot = torch.diag(torch.tensor([1.0, -1.0, -1.0], dtype=torch.float64))
    else:
        vx = torch.tensor([[0, -v[2], v[1]], [v[2], 0, -v[0]], [-v[1], v[0], 0]], dtype=torch.float64)
        rot = torch.eye(3, dtype=torch.float64) + vx + vx @ vx / (1 + c)
    affine = torch.eye(4, dtype=torch.float64)
    affine[:3, :3] = rot @ torch.diag(torch.tensor([float(x) for x in voxel_size], dtype=torch.float64))
    affine[:3, 3] = -affine[:3, :3] @ ((torch.tensor([float(n) for n in shape], dtype=torch.float64) - 1) / 2)
    return affine


def simulate_case(
    phantom: Phantom,
    shape: Sequence[int],
    voxel_size: Sequence[float] = (1.0, 1.0, 1.0),
    b0_direction: Sequence[float] = (0.0, 0.0, 1.0),
    snr: float | None = 40.0,
    seed: int = 0,
    mask: torch.Tensor | None = None,
) -> dict:
    """Simulate one whole case: χ (ppm), its local field (ppm, noisy at ``snr``) and the mask.

    χ is zero outside the mask (the phantom's brain mask, else ``mask``, else a random ellipsoidal head); the field
    is simulated with padding, demeaned inside the mask, and Gaussian noise with σ = RMS(field in mask) / snr is
    added (``snr=None``: noiseless).

    Returns:
        dict with float32 (X, Y, Z) tensors ``field``, ``chi``, ``mask``; ``affine`` (4, 4), a grid centred on the
        origin whose B0 direction (world z) is ``b0_direction`` in voxel coordinates (see :func:`scanner_affine`);
        and, when the phantom provides them, ``labels``, ``lesion_ids`` and ``lesions`` (lesion records).
    """
    gen = torch.Generator().manual_seed(int(seed))
    shape = tuple(int(s) for s in shape)
    out = phantom(shape, voxel_size, generator=gen)
    extras = {}
    if isinstance(out, dict):
        chi, mask = out["chi"], out.get("mask", mask)
        extras = {k: out[k] for k in ("labels", "lesion_ids", "lesions") if k in out}
    else:
        chi = out
    if mask is None:
        mask = ellipsoid_mask(shape, voxel_size, gen)
    mask = mask.bool()
    chi = chi.float() * mask
    field = forward_field(chi, voxel_size, b0_direction, mask=mask)
    if snr is not None:
        rms = field[mask].square().mean().sqrt()
        field = (field + torch.randn(shape, generator=gen) * rms / float(snr)) * mask
    affine = scanner_affine(shape, voxel_size, b0_direction)
    return {"field": field, "chi": chi, "mask": mask.float(), "affine": affine, **extras}


class SimulatedVolumes(Dataset):
    """A fixed set of whole simulated cases for validation: items ``{"image", "label", "mask"}`` as
    channel-first :class:`monai.data.MetaTensor` with the case affine, cases ``seed, seed + 1, …``.

    Keywords:
        phantom: phantom generator (default :class:`RandomSourcePhantom`).
        num_cases: number of volumes.
        shape: grid size (X, Y, Z); deliberately not a multiple of 48 by default.
        voxel_size, b0_direction, snr, seed: as in :func:`simulate_case`.
    """

    def __init__(
        self,
        phantom: Phantom | None = None,
        num_cases: int = 2,
        shape: Sequence[int] = (100, 100, 90),
        voxel_size: Sequence[float] = (1.0, 1.0, 1.0),
        b0_direction: Sequence[float] = (0.0, 0.0, 1.0),
        snr: float | None = 40.0,
        seed: int = 10_000,
    ) -> None:
        from .phantoms import RandomSourcePhantom

        phantom = phantom if phantom is not None else RandomSourcePhantom()
        items = []
        for i in range(int(num_cases)):
            case = simulate_case(phantom, shape, voxel_size, b0_direction, snr, seed + i)
            meta = {"affine": case["affine"], "filename_or_obj": f"simulated_{seed + i}"}
            items.append({k: MetaTensor(case[v][None], meta=dict(meta)) for k, v in _KEYS.items()})
        super().__init__(items)


_KEYS = {"image": "field", "label": "chi", "mask": "mask"}


def training_dataset(
    synthetic: SyntheticPatchStream, datalist: str | None = None, transform: Compose | None = None
) -> IterableDataset | Dataset:
    """The training data (``train#dataset``): the synthetic stream, or the ``training`` list of a user datalist JSON.

    Arguments:
        synthetic: the synthetic engine, used when ``datalist`` is None.
        datalist: path to a MONAI datalist JSON whose ``training`` items have ``image`` (local field, ppm),
            ``label`` (χ, ppm) and ``mask`` NIfTI paths, relative to the JSON's folder.
        transform: MONAI transforms that load and patch-sample the user's items (``train#preprocessing``).
    """
    if datalist is None:
        return synthetic
    if transform is None:
        raise ValueError("a datalist needs the loading/patch-sampling transforms (train#preprocessing)")
    items = load_decathlon_datalist(datalist, is_segmentation=True, data_list_key="training")
    return Dataset(items, transform=transform)


def training_loader(dataset: IterableDataset | Dataset, batch_size: int, num_workers: int = 0) -> DataLoader:
    """The training DataLoader of :func:`training_dataset`'s data.

    The synthetic stream yields whole batches (no collation: MONAI's list collate expects a list of samples); a
    user dataset is shuffled (one shard per rank with several processes) and collated into ``batch_size``.
    """
    if isinstance(dataset, IterableDataset):
        return torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=num_workers)
    sampler = None
    if _rank_and_world()[1] > 1:
        sampler = torch.utils.data.DistributedSampler(dataset)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=sampler is None,
        sampler=sampler,
        num_workers=num_workers,
    )


def validation_dataset(simulated: Dataset, datalist: str | None = None, transforms: Compose | None = None) -> Dataset:
    """Whole volumes for validation: the simulated set, or the ``validation`` items of a user datalist."""
    if datalist is None:
        return simulated
    if transforms is None:
        raise ValueError("a datalist needs the loading transforms (validate#user_transforms)")
    items = load_decathlon_datalist(datalist, is_segmentation=True, data_list_key="validation")
    return Dataset(items, transform=transforms)


def to_numpy(t: torch.Tensor) -> np.ndarray:
    """Detach a tensor to a NumPy array (float32 for floating data)."""
    a = t.detach().cpu().numpy()
    return a.astype(np.float32) if a.dtype.kind == "f" else a
