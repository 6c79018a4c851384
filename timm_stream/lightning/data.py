"""Large-image data for streaming training: CSV or folder layouts, TIFF (tiled / pyramidal), PNG, JPEG.

Design points (gigapixel images):

* The dataset holds paths and labels only (as numpy arrays, so forked workers do not copy-on-write
  Python objects); every image is read in ``__getitem__``.
* Images stay ``uint8`` until the model normalizes them tile by tile (``normalize_input=True``).
* Augmentations are the 8 flips / 90-degree rotations, applied as numpy *views* (no copy); the one
  copy every image needs -- into a contiguous ``(C, H, W)`` tensor -- is made by :func:`collate_images`
  straight into shared memory when it runs in a worker, so the main process receives it without
  another copy.
* Variable image sizes: batches of equal-sized images are stacked; otherwise the batch's ``image`` is
  a list of ``(1, C, H, W)`` tensors that :class:`~timm_stream.lightning.StreamingClassifier` runs one
  by one. The default batch size is 1 (use ``Trainer(accumulate_grad_batches=...)`` for larger
  effective batches).
* Slides (TIFF, SVS, NDPI, OME-TIFF; OpenSlide formats when installed) are read through
  :mod:`timm_stream.io`; with ``lazy=True`` they reach the model as lazy images (regions read per tile,
  flips/rotations as views, batch size 1), optionally with tissue masks or mask files.
* Every image of the stages being set up is checked before training starts, reading only headers:
  missing or unreadable files (truncated or corrupt included: cheap structural checks, or a full
  decode with ``check="decode"``), labels outside the class range, images smaller than the network's
  stride. All problems are reported at once, each naming its file.
"""
from __future__ import annotations

import csv
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, get_worker_info

from lightning.pytorch import LightningDataModule

from timm_stream.io import TIFF_SUFFIXES, ImageReadError, OrientedImage, check_image, is_lazy_image, open_image, tissue_mask
from timm_stream.io.image import orient
from timm_stream.io.open import is_slide_file
from timm_stream.io.pil import decode_pil

__all__ = [
    "IMAGE_SUFFIXES", "ImageInfo", "DataValidationError", "ImageReadError", "read_image_info", "read_image",
    "LargeImageDataset", "collate_images", "read_mask", "read_mask_column", "LargeImageDataModule", "read_csv",
    "read_folder", "validate_entries", "entry_problems", "overlap_problems", "SPLITS",
]

IMAGE_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg", ".svs", ".ndpi", ".btf")
SPLITS = ("train", "val", "test", "predict")
_SPLIT_ALIASES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
                  "test": "test", "testing": "test", "predict": "predict", "prediction": "predict"}
_MAX_LISTED = 50


class DataValidationError(ValueError):
    """The data cannot be used as given; the message lists every problem found, each with its file."""


# ------------------------------------------------------------------------------------------ readers
# All file reading goes through timm_stream.io (levels, mpp, lazy regions, integrity checks); this
# section only adapts it to the dataset's numpy views and header checks.
@dataclass(frozen=True)
class ImageInfo:
    """What the header of an image says: size of the chosen level, channels, dtype."""

    height: int
    width: int
    channels: int
    dtype: str
    level: int = 0
    levels: int = 1


def _is_slide(path: str) -> bool:
    """Files read lazily when the dataset is asked to: TIFF and the slide formats (by content, not name)."""
    try:
        return is_slide_file(path)
    except OSError:
        return False


def read_image_info(path: str | os.PathLike, *, level: int | None = None, mpp: float | None = None,
                    check: str = "structure") -> ImageInfo:
    """Size, channels and dtype of ``path`` (the chosen pyramid level of a slide), from its header.

    Args:
        check: ``"structure"`` (default): also the cheap integrity checks of
            :func:`timm_stream.io.check_image` (a truncated/corrupt TIFF, PNG or JPEG is reported here,
            not mid-epoch); ``"decode"``: decode every pixel as well (slow); ``"header"``: none.

    Raises:
        ImageReadError: naming the file, the problem and the fix.
    """
    path = os.fspath(path)
    if check not in ("header", "structure", "decode"):
        raise ValueError(f"check must be 'header', 'structure' or 'decode', got {check!r}")
    if not os.path.isfile(path):
        raise ImageReadError(f"{path}: file not found")
    try:
        if check != "header":
            check_image(path, decode=check == "decode")
        image = open_image(path, level=level, mpp=mpp)
        return ImageInfo(int(image.shape[2]), int(image.shape[3]), int(image.shape[1]), "uint8", image.level,
                         len(image.level_shapes))
    except (ImageReadError, ValueError):
        raise
    except Exception as exc:  # noqa: BLE001 - whatever the decoder says, name the file
        raise ImageReadError(f"{path}: cannot read the image header ({type(exc).__name__}: {exc})") from exc


def _adapt_channels(hwc: np.ndarray, channels: int, path: str) -> np.ndarray:
    """(H, W, c) -> (H, W, channels) as a view: gray is broadcast, alpha dropped."""
    have = hwc.shape[2]
    if have == channels:
        return hwc
    if have == 1:
        return np.broadcast_to(hwc, hwc.shape[:2] + (channels,))
    if have == 2 and channels in (1, 3):  # gray + alpha
        return _adapt_channels(hwc[:, :, :1], channels, path)
    if have == 4 and channels == 3:
        return hwc[:, :, :3]
    raise ImageReadError(f"{path}: the image has {have} channels, the model takes {channels}")


def read_image(path: str | os.PathLike, *, level: int | None = None, mpp: float | None = None,
               channels: int = 3) -> np.ndarray:
    """The image as a uint8 ``(H, W, channels)`` array (a view of what the decoder returned: gray is
    broadcast to the channels without copying). Slides are read whole at the chosen level: use
    :func:`timm_stream.open_image` for lazy, region-wise reading."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ImageReadError(f"{path}: file not found")
    try:
        if _is_slide(path):
            array = open_image(path, level=level, mpp=mpp).read()[0].numpy().transpose(1, 2, 0)
        else:
            open_image(path, level=level, mpp=mpp)  # refuses level/mpp for single-resolution formats
            array = decode_pil(path)
    except (ImageReadError, ValueError):
        raise
    except Exception as exc:  # noqa: BLE001
        raise ImageReadError(f"{path}: cannot read the image ({type(exc).__name__}: {exc})") from exc
    return _adapt_channels(array, channels, path)


def read_mask(path: str | os.PathLike, *, max_size: int = 1024) -> torch.Tensor:
    """A mask file (any image ``open_image`` reads; nonzero = inside) as a bool ``(1, 1, h, w)`` tensor,
    from its lowest-resolution level, reduced to at most ``max_size`` pixels a side (a block is inside
    if any of its pixels is)."""
    from timm_stream.io.tissue import thumbnail

    image = open_image(path)
    if len(image.level_shapes) > 1:
        image = image.at_level(len(image.level_shapes) - 1)
    small = thumbnail(image, max_size=max_size)
    return (small.amax(1, keepdim=True) > 0)


def read_mask_column(csv_path: str | os.PathLike) -> dict[str, str]:
    """The optional ``mask`` column of a ``path,label[,split],mask`` CSV (with a header row): image path ->
    mask file, both resolved like :func:`read_csv` (relative to the CSV's folder); empty cells are left out.

    Raises:
        DataValidationError: a mask file that does not exist (all of them listed, with their lines).
    """
    csv_path = os.fspath(csv_path)
    base = os.path.dirname(os.path.abspath(csv_path))
    with open(csv_path, newline="", encoding="utf-8-sig") as f:
        rows = [row for row in csv.reader(f) if row and any(c.strip() for c in row)]
    header = [c.strip().lower() for c in rows[0]] if rows else []
    if "mask" not in header or "path" not in header:
        return {}
    column, path_column = header.index("mask"), header.index("path")
    found: dict[str, str] = {}
    missing = []
    for line, row in enumerate(rows[1:], start=2):
        cells = [c.strip() for c in row]
        if column >= len(cells) or not cells[column]:
            continue
        image, mask = (c if os.path.isabs(c) else os.path.join(base, c) for c in (cells[path_column], cells[column]))
        if not os.path.isfile(mask):
            missing.append(f"{csv_path}, line {line}: mask file {mask} not found")
        found[image] = mask
    if missing:
        raise DataValidationError(f"{len(missing)} missing mask file(s):\n  " + "\n  ".join(missing[:_MAX_LISTED]))
    return found


# ------------------------------------------------------------------------------------------ dataset
class LargeImageDataset(Dataset):
    """Images read from disk in ``__getitem__``; holds paths and labels only.

    Items are dicts: ``image`` (uint8 ``(C, H, W)`` numpy *view*, possibly flipped/rotated, possibly
    with negative strides: :func:`collate_images` makes the tensor; with ``lazy=True``, slide files are a
    lazy ``(1, C, H, W)`` image instead, see :func:`timm_stream.open_image`, flips/rotations applied
    lazily by :class:`timm_stream.io.OrientedImage`), ``label`` (int, -1 if unknown), ``path`` (str),
    ``index``, and ``mask`` (bool ``(1, 1, h, w)`` tensor or None).

    Args:
        paths, labels: the images and their class indices (None or -1: unlabeled).
        level, mpp: pyramid level (negative: from the smallest) or target microns per pixel (the
            level closest to it) of slide files.
        augment: random flips and 90-degree rotations (the 8 symmetries of the square), as views.
        channels: channels the model takes (gray is broadcast, alpha dropped).
        lazy: slide files (TIFF, SVS, ...) as lazy images (nothing read until the model reads tiles).
        tissue_masks: give every item the mask of :func:`timm_stream.tissue_mask`.
        masks: mask files, one per image (None: none for that image); they take precedence over
            ``tissue_masks``.
    """

    def __init__(self, paths: Sequence[str], labels: Sequence[int | None] | None = None, *,
                 level: int | None = None, mpp: float | None = None, augment: bool = False, channels: int = 3,
                 lazy: bool = False, tissue_masks: bool = False, masks: Sequence[str | None] | None = None):
        self.paths = np.array([os.fspath(p) for p in paths], dtype=np.str_)
        labels = [-1] * len(self.paths) if labels is None else [-1 if v is None else int(v) for v in labels]
        if len(labels) != len(self.paths):
            raise ValueError(f"{len(self.paths)} paths but {len(labels)} labels")
        if masks is not None and len(masks) != len(self.paths):
            raise ValueError(f"{len(self.paths)} paths but {len(masks)} masks")
        self.labels = np.array(labels, dtype=np.int64)
        self.masks = None if masks is None else np.array([os.fspath(m) if m else "" for m in masks], dtype=np.str_)
        self.level, self.mpp, self.augment, self.channels = level, mpp, augment, channels
        self.lazy, self.tissue_masks = lazy, tissue_masks

    def __len__(self) -> int:
        return len(self.paths)

    def _mask(self, index: int, image: Any) -> torch.Tensor | None:
        """The item's mask, before augmentation (the caller orients it with the image). An empty mask (a
        blank slide, an all-zero mask file) would leave nothing to pool: the whole image is pooled instead,
        with a warning naming the file, rather than failing mid-epoch."""
        if self.masks is not None and self.masks[index]:
            mask, what = read_mask(str(self.masks[index])), f"mask file {self.masks[index]}"
        elif self.tissue_masks:
            mask, what = tissue_mask(image), "tissue mask (timm_stream.tissue_mask)"
        else:
            return None
        if not bool(mask.any()):
            warnings.warn(f"{self.paths[index]}: the {what} is empty (no tissue found): the whole image is "
                          "pooled instead; check the slide, or drop it from the data", stacklevel=2)
            return None
        return mask

    def __getitem__(self, index: int) -> dict[str, Any]:
        path = str(self.paths[index])
        choice = int(torch.randint(8, ()).item()) if self.augment else 0  # torch's RNG: seeded per worker
        if self.lazy and _is_slide(path):
            image = open_image(path, level=self.level, mpp=self.mpp, channels=self.channels)
            mask = self._mask(index, image)
            if choice:
                view = OrientedImage(image, choice % 4, choice >= 4)
                image, mask = view, (None if mask is None else view.orient(mask))
            return {"image": image, "label": int(self.labels[index]), "path": path, "index": index, "mask": mask}
        hwc = read_image(path, level=self.level, mpp=self.mpp, channels=self.channels)
        mask = None
        if self.tissue_masks or (self.masks is not None and self.masks[index]):
            mask = self._mask(index, torch.from_numpy(np.ascontiguousarray(hwc)).permute(2, 0, 1)[None])
        if choice:
            hwc = np.rot90(hwc, choice % 4, axes=(0, 1))
            if choice >= 4:
                hwc = hwc[:, ::-1]
            if mask is not None:  # the same symmetry (rot90, then mirror) as the image
                mask = orient(mask, choice % 4, choice >= 4)
        return {"image": hwc.transpose(2, 0, 1), "label": int(self.labels[index]), "path": path, "index": index,
                "mask": mask}


def _new_uint8(shape: tuple[int, ...]) -> torch.Tensor:
    """An uninitialized uint8 tensor; in shared memory when called in a DataLoader worker (as
    ``default_collate`` does), so that it reaches the main process without another copy."""
    if get_worker_info() is not None:
        try:
            elem = torch.empty(0, dtype=torch.uint8)
            storage = elem._typed_storage()._new_shared(int(np.prod(shape)), device="cpu")
            return elem.new(storage).resize_(shape)
        except (AttributeError, RuntimeError):  # pragma: no cover - private API moved: plain allocation
            pass
    return torch.empty(shape, dtype=torch.uint8)


def _to_tensor(arrays: Sequence[np.ndarray]) -> torch.Tensor:
    out = _new_uint8((len(arrays),) + tuple(arrays[0].shape))
    target = out.numpy()
    for i, array in enumerate(arrays):
        np.copyto(target[i], array)  # the one copy: any strides (views, flips, broadcasts) to contiguous
    return out


def collate_images(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Batch items of :class:`LargeImageDataset`: ``image`` is a ``(N, C, H, W)`` uint8 tensor when all
    images have one size, else a list of ``(1, C, H, W)`` tensors; a lazy image (batch size 1), or a list
    of them, for lazily read slides; ``label`` a long tensor (-1: unknown); ``path`` a list of str;
    ``index`` a long tensor; ``mask`` a bool ``(N, 1, h, w)`` tensor (a list if sizes differ, or for
    lazy images), or None when no item has one."""
    images: Any
    lazy_item = lambda image: not isinstance(image, np.ndarray) and is_lazy_image(image)  # noqa: E731
    if any(lazy_item(item["image"]) for item in items):
        lazy = [item["image"] if lazy_item(item["image"]) else torch.from_numpy(
            np.ascontiguousarray(item["image"]))[None] for item in items]
        images = lazy[0] if len(lazy) == 1 else lazy
    else:
        arrays = [item["image"] for item in items]
        if all(a.shape == arrays[0].shape for a in arrays):
            images = _to_tensor(arrays)
        else:
            images = [_to_tensor([a]) for a in arrays]
    masks = [item.get("mask") for item in items]
    if all(m is None for m in masks):
        mask = None
    elif any(m is None for m in masks):
        raise ValueError("some items of the batch have a mask and others not: give a mask for every image "
                         "(or none)")
    elif not isinstance(images, list) and all(m.shape == masks[0].shape for m in masks):
        mask = torch.cat(masks)
    else:
        mask = masks
    return {
        "image": images,
        "label": torch.tensor([item["label"] for item in items], dtype=torch.long),
        "path": [item["path"] for item in items],
        "index": torch.tensor([item["index"] for item in items], dtype=torch.long),
        "mask": mask,
    }


# ------------------------------------------------------------------------------------------ layouts
Entries = list[tuple[str, "int | str | None"]]


def _split_name(value: str, where: str) -> str:
    key = value.strip().lower()
    if key not in _SPLIT_ALIASES:
        raise DataValidationError(f"{where}: unknown split '{value}'; use one of {', '.join(SPLITS)}")
    return _SPLIT_ALIASES[key]


def _looks_like_image_path(cell: str) -> bool:
    return cell.lower().endswith(IMAGE_SUFFIXES + TIFF_SUFFIXES)


def _hidden(path: Path, root: Path) -> bool:
    """A dot entry (``.ipynb_checkpoints``, ``.DS_Store``, ``._x.png`` of macOS) anywhere below ``root``."""
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def _images_under(folder: Path) -> list[Path]:
    return [p for p in sorted(folder.rglob("*"))
            if p.suffix.lower() in IMAGE_SUFFIXES and not _hidden(p, folder) and p.is_file()]


def read_csv(csv_path: str | os.PathLike) -> dict[str, Entries]:
    """``path,label[,split]`` rows (a header row naming the columns is optional -- a first row whose first
    cell is not an image path is a header and must name ``path,label[,split]``; relative paths are
    relative to the CSV's folder; an empty label means unlabeled). Rows without a split column are
    all ``train``. Labels are kept as written (int or class name) until :func:`resolve_labels`."""
    csv_path = os.fspath(csv_path)
    if not os.path.isfile(csv_path):
        raise DataValidationError(f"{csv_path}: CSV file not found")
    base = os.path.dirname(os.path.abspath(csv_path))
    splits: dict[str, Entries] = {}
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as f:
            rows = [(n, row) for n, row in enumerate(csv.reader(f), start=1) if row and any(c.strip() for c in row)]
    except UnicodeDecodeError as exc:
        raise DataValidationError(
            f"{csv_path}: not UTF-8 text (byte {exc.start}: {exc.reason}); save the CSV as UTF-8 (e.g. in "
            "a spreadsheet: 'CSV UTF-8'; or iconv -f latin1 -t utf-8)") from None
    if not rows:
        raise DataValidationError(f"{csv_path}: the CSV is empty")
    columns = {"path": 0, "label": 1, "split": 2}
    known = (*columns, "mask")  # the optional mask column: see read_mask_column
    first = [c.strip().lower() for c in rows[0][1]]
    if not _looks_like_image_path(first[0]):  # a header row: it must name the columns
        named = [c for c in first if c in known]
        if "path" not in named or "label" not in named or len(named) != len(first) or len(set(named)) != len(named):
            raise DataValidationError(
                f"{csv_path}, line {rows[0][0]}: the header {rows[0][1]} does not name the columns "
                "path,label[,split][,mask]; rename them (e.g. 'path,label,split'), or drop the header row if the "
                "first row is an image")
        columns = {name: first.index(name) for name in named}
        rows = rows[1:]
    for line, row in rows:
        where = f"{csv_path}, line {line}"
        cells = [c.strip() for c in row]
        get = lambda name: cells[columns[name]] if name in columns and columns[name] < len(cells) else ""  # noqa: E731
        path = get("path")
        if not path:
            raise DataValidationError(f"{where}: no image path")
        label: int | str | None = get("label") or None
        if label is not None:
            try:
                label = int(label)
            except ValueError:
                pass  # a class name
        split = _split_name(get("split"), where) if get("split") else "train"
        full = path if os.path.isabs(path) else os.path.join(base, path)
        splits.setdefault(split, []).append((full, label))
    return splits


def read_folder(root: str | os.PathLike) -> dict[str, Entries]:
    """``root/<split>/<class name>/<image>`` (split: train, val, test), plus unlabeled images anywhere
    under ``root/predict/``. Labels are class names (folder names). Hidden entries (names starting with a
    dot: ``.ipynb_checkpoints``, ``.DS_Store``) are never classes or images."""
    root = Path(root)
    if not root.is_dir():
        raise DataValidationError(f"{root}: folder not found")
    found = {p.name: p for p in root.iterdir() if p.is_dir() and p.name.lower() in _SPLIT_ALIASES}  # no dot names
    if not found:
        raise DataValidationError(
            f"{root}: expected split folders ({', '.join(SPLITS)}) holding one folder per class, e.g. "
            f"{root}/train/<class>/image.tif; or use a CSV (path,label,split)")
    splits: dict[str, Entries] = {}
    for name, folder in sorted(found.items()):
        split = _SPLIT_ALIASES[name.lower()]
        entries = splits.setdefault(split, [])
        if split == "predict":
            entries += [(str(p), None) for p in _images_under(folder)]
            continue
        for class_dir in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
            entries += [(str(p), class_dir.name) for p in _images_under(class_dir)]
    return splits


def read_source(source: str | os.PathLike) -> dict[str, Entries]:
    """A CSV file, a folder layout, or (for prediction) a single image file."""
    source = os.fspath(source)
    if os.path.isdir(source):
        layout = Path(source)
        if any(p.is_dir() and p.name.lower() in _SPLIT_ALIASES for p in layout.iterdir()):
            return read_folder(source)
        return {"predict": [(str(p), None) for p in _images_under(layout)]}
    if source.lower().endswith(IMAGE_SUFFIXES):
        return {"predict": [(source, None)]}
    return read_csv(source)


def resolve_labels(splits: dict[str, Entries], label_names: Sequence[str] | None,
                   source: str) -> tuple[dict[str, list[tuple[str, int | None]]], list[str] | None]:
    """Class names -> indices. Integer labels are kept; names are looked up in ``label_names``, or, if
    none are given, in the sorted set of names found in all splits."""
    names = {label for entries in splits.values() for _, label in entries if isinstance(label, str)}
    numbers = any(isinstance(label, int) for entries in splits.values() for _, label in entries)
    if names and numbers:
        raise DataValidationError(f"{source}: labels mix class indices and class names; use one or the other")
    if names:
        if label_names is None:
            label_names = sorted(names)
        unknown = sorted(names - set(label_names))
        if unknown:
            bad = [p for entries in splits.values() for p, label in entries if label in unknown][:5]
            raise DataValidationError(f"{source}: class name(s) {unknown} are not in label_names {list(label_names)} "
                                      f"(e.g. {', '.join(bad)})")
    index = {name: i for i, name in enumerate(label_names or [])}
    resolved = {split: [(p, index[label] if isinstance(label, str) else label) for p, label in entries]
                for split, entries in splits.items()}
    return resolved, (list(label_names) if label_names is not None else None)


def validate_entries(entries: Sequence[tuple[str, int | None]], *, num_classes: int | None,
                     min_size: tuple[int, int] = (1, 1), level: int | None = None, mpp: float | None = None,
                     channels: int = 3, require_labels: bool = True, what: str = "data",
                     check: str = "structure") -> list[ImageInfo]:
    """Check every image from its header (exists, readable, 8-bit, large enough, channels usable) and
    every label (present, in ``0..num_classes-1``). Raises one :class:`DataValidationError` listing all
    problems, each naming its file; returns the headers."""
    problems, infos = entry_problems(entries, num_classes=num_classes, min_size=min_size, level=level, mpp=mpp,
                                     channels=channels, require_labels=require_labels, check=check)
    if problems:
        raise DataValidationError(_report(problems, f"the {what} ({len(entries)} images)"))
    return infos


def _report(problems: Sequence[str], where: str) -> str:
    listed = "\n  ".join(problems[:_MAX_LISTED])
    more = f"\n  ... and {len(problems) - _MAX_LISTED} more" if len(problems) > _MAX_LISTED else ""
    return f"{len(problems)} problem(s) in {where}:\n  {listed}{more}"


def entry_problems(entries: Sequence[tuple[str, int | None]], *, num_classes: int | None,
                   min_size: tuple[int, int] = (1, 1), level: int | None = None, mpp: float | None = None,
                   channels: int = 3, require_labels: bool = True,
                   check: str = "structure") -> tuple[list[str], list[ImageInfo]]:
    """The checks of :func:`validate_entries`, returned instead of raised: ``(problems, headers)``."""
    problems: list[str] = []
    infos: list[ImageInfo] = []
    for path, label in entries:
        if require_labels and label is None:
            problems.append(f"{path}: no label")
        elif label is not None and num_classes is not None and not 0 <= label < num_classes:
            problems.append(f"{path}: label {label} is outside the class range 0..{num_classes - 1} "
                            f"(num_classes={num_classes})")
        try:
            info = read_image_info(path, level=level, mpp=mpp, check=check)
        except (ImageReadError, ValueError) as exc:
            problems.append(str(exc))
            continue
        infos.append(info)
        where = f" (pyramid level {info.level} of {info.levels})" if info.levels > 1 else ""
        if info.dtype != "uint8":
            problems.append(f"{path}: pixels are {info.dtype}, not uint8; convert the image to 8 bits")
        if info.height < min_size[0] or info.width < min_size[1]:
            problems.append(f"{path}: image is {info.height}x{info.width} px{where}, smaller than the smallest "
                            f"input the model runs on ({min_size[0]}x{min_size[1]} px): use a finer level or "
                            "remove it")
        if info.channels not in (channels, 1) and not (info.channels == 4 and channels == 3) \
                and not (info.channels == 2 and channels in (1, 3)):
            problems.append(f"{path}: the image has {info.channels} channels, the model takes {channels}")
    return problems, infos


def overlap_problems(splits: dict[str, Sequence[tuple[str, Any]]]) -> list[str]:
    """Files listed twice in one split and files in two of train/val/test (leakage: a model validated or
    tested on its own training images). The same file is the same real path (symbolic links followed).
    ``predict`` is exempt (it defaults to the test split)."""
    problems, seen = [], {}
    for split in ("train", "val", "test"):
        counts: dict[str, int] = {}
        for path, _ in splits.get(split, ()):
            real = os.path.realpath(path)
            counts[real] = counts.get(real, 0) + 1
            if counts[real] == 2:
                problems.append(f"{path}: listed more than once in the '{split}' split; remove the duplicate rows")
            other = seen.setdefault(real, split)
            if other != split and counts[real] == 1:
                problems.append(f"{path}: in both the '{other}' and the '{split}' split (leakage: the model would "
                                f"be evaluated on images it trained on); keep it in one split")
    return problems


# ------------------------------------------------------------------------------------------ datamodule
_STAGE_SPLITS = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("predict",)}


class LargeImageDataModule(LightningDataModule):
    """Large images from a CSV or a folder layout.

    Args:
        csv: CSV of ``path,label[,split]`` (header optional; labels are class indices or class names;
            split: train / val / test / predict, default train; relative paths are relative to the CSV;
            with a header, an optional ``mask`` column names a mask file per image, see ``tissue_masks``).
        root: instead of ``csv``: ``root/<split>/<class name>/<image>`` (and unlabeled images under
            ``root/predict/``).
        predict: what ``predict`` runs on: a CSV, a folder (of images, or a layout) or one image.
            Default: the ``predict`` split, else the ``test`` split, of ``csv``/``root``.
        label_names: class names in class-index order (default: the model's, else the sorted names
            found in the data).
        num_classes: for use without a :class:`StreamingClassifier` (default: the model's).
        level: TIFF pyramid level to read (0: full resolution; negative: from the smallest).
        mpp: instead of ``level``: the TIFF level closest to this many microns per pixel.
        batch_size: images per batch (default 1; images of different sizes are batched as a list).
        num_workers: DataLoader worker processes.
        pin_memory: pin batches (only for GPU training with images small enough to pin).
        augment: random flips and 90-degree rotations of training images.
        validate: check every image header and label before training (recommended).
        channels: input channels of the model.
        images_on_host: leave images in host memory (labels still go to the device): the engine moves
            one tile at a time to the device. For images too large for device memory even as uint8.
        lazy: yield slide files (TIFF, SVS, NDPI, ...) as lazy images (:func:`timm_stream.open_image`;
            regions are read as the model's tiles need them; flips/rotations are lazy views). The model
            must accept lazy images (the whole-slide engine); implies ``images_on_host``.
        tissue_masks: give each batch the ``mask`` of :func:`timm_stream.tissue_mask` (from each slide's
            lowest-resolution level). A ``mask`` column in the CSV (mask files: nonzero = inside) takes
            precedence for the rows that fill it.
        check: integrity check of every file before training: ``"structure"`` (cheap: TIFF tiles inside
            the file, PNG chunks, JPEG end marker), ``"decode"`` (decode every pixel: slow), ``"header"``.
    """

    def __init__(self, csv: str | None = None, root: str | None = None, predict: str | None = None,
                 label_names: list[str] | None = None, num_classes: int | None = None,
                 level: int | None = None, mpp: float | None = None, batch_size: int = 1, num_workers: int = 2,
                 pin_memory: bool = False, augment: bool = True, validate: bool = True, channels: int = 3,
                 images_on_host: bool = False, lazy: bool = False, tissue_masks: bool = False,
                 check: str = "structure"):
        super().__init__()
        if csv is not None and root is not None:
            raise ValueError("give either csv or root, not both")
        if level is not None and mpp is not None:
            raise ValueError("give either level or mpp, not both")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if lazy and batch_size != 1:
            raise ValueError(f"lazy slides are read one per batch: set batch_size: 1 (got {batch_size}) and use "
                             "Trainer(accumulate_grad_batches=...) for larger effective batches")
        self.csv, self.root, self.predict_source = csv, root, predict
        self.label_names = list(label_names) if label_names is not None else None
        self.num_classes = num_classes
        self.level, self.mpp, self.channels = level, mpp, channels
        self.batch_size, self.num_workers, self.pin_memory = batch_size, num_workers, pin_memory
        self.augment, self.validate = augment, validate
        self.images_on_host = images_on_host or lazy
        self.lazy, self.tissue_masks, self.check = lazy, tissue_masks, check
        self.splits: dict[str, list[tuple[str, int | None]]] = {}
        self.datasets: dict[str, LargeImageDataset] = {}

    # -------------------------------------------------------------- what the model says
    def _model(self):
        trainer = getattr(self, "trainer", None)
        return trainer.lightning_module if trainer is not None else None

    def _model_num_classes(self) -> int | None:
        model = self._model()
        return getattr(model, "num_classes", None) if model is not None else None

    def _min_size(self) -> tuple[int, int]:
        model = self._model()
        return tuple(getattr(model, "min_input_size", (1, 1))) if model is not None else (1, 1)

    # -------------------------------------------------------------- setup
    def _source_splits(self, stage: str | None = None) -> tuple[dict[str, Entries], str]:
        splits: dict[str, Entries] = {}
        source = self.csv or self.root or ""
        # predicting on given images needs nothing from the training data (a recipe's csv may not exist here)
        if stage == "predict" and self.predict_source is not None:
            source = ""
        elif self.csv is not None:
            splits = read_csv(self.csv)
        elif self.root is not None:
            splits = read_folder(self.root)
        if self.predict_source is not None:
            splits["predict"] = [e for s, entries in read_source(self.predict_source).items() for e in entries]
        elif "predict" not in splits and "test" in splits:
            splits["predict"] = list(splits["test"])
        return splits, source

    def setup(self, stage: str | None = None) -> None:
        model = self._model()
        label_names = self.label_names
        model_names = getattr(model, "label_names", None) if model is not None else None
        if model_names is not None:
            if label_names is not None and list(label_names) != list(model_names):
                raise DataValidationError(f"data label_names {label_names} differ from the model's {model_names}")
            label_names = model_names
        splits, source = self._source_splits(stage)
        self.splits, self.label_names = resolve_labels(splits, label_names, source)
        if model is not None and model_names is None and self.label_names is not None \
                and hasattr(model, "label_names"):
            model.label_names = list(self.label_names)  # stored in checkpoints and exported models
        num_classes = self._model_num_classes() or self.num_classes
        if num_classes is None and self.label_names is not None:
            num_classes = len(self.label_names)
        if self.label_names is not None and num_classes is not None and len(self.label_names) != num_classes:
            raise DataValidationError(f"{source}: {len(self.label_names)} class names {self.label_names} but the "
                                      f"model has num_classes={num_classes}")
        wanted = _STAGE_SPLITS[stage] if stage in _STAGE_SPLITS else ("train", "val", "test")
        # Every problem of every split being set up, in one error: a bad label in train must not hide a
        # missing file in val until the next run.
        problems: list[str] = []
        min_size = self._min_size() if self.validate else (1, 1)
        for split in wanted:
            entries = self.splits.get(split)
            if not entries:
                if split != "val" or stage == "validate":  # validation during fit is optional
                    problems.append(
                        f"no '{split}' images in {self.predict_source if split == 'predict' and self.predict_source else source}: "
                        f"give rows with split '{split}' (or the folder {split}/)")
                continue
            if self.validate:
                found, _ = entry_problems(entries, num_classes=num_classes, min_size=min_size, level=self.level,
                                          mpp=self.mpp, channels=self.channels, require_labels=split != "predict",
                                          check=self.check)
                problems += [f"[{split}] {p}" for p in found]
        if self.validate:
            problems += overlap_problems({s: e for s, e in self.splits.items() if s in wanted})
        if problems:
            raise DataValidationError(_report(problems, f"the {'/'.join(wanted)} data of {source or self.predict_source}"))
        mask_files = read_mask_column(self.csv) if self.csv is not None and source == self.csv else {}
        for split in wanted:
            entries = self.splits.get(split)
            if not entries:
                continue
            self.datasets[split] = LargeImageDataset(
                [p for p, _ in entries], [label for _, label in entries], level=self.level, mpp=self.mpp,
                augment=self.augment and split == "train", channels=self.channels, lazy=self.lazy,
                tissue_masks=self.tissue_masks,
                masks=[mask_files.get(p) for p, _ in entries] if mask_files else None)

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        if self.images_on_host and isinstance(batch, dict) and "image" in batch:
            rest = {k: v for k, v in batch.items() if k != "image"}
            return {**super().transfer_batch_to_device(rest, device, dataloader_idx), "image": batch["image"]}
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    # -------------------------------------------------------------- loaders
    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        dataset = self.datasets[split]
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=shuffle, num_workers=self.num_workers,
                          collate_fn=collate_images, pin_memory=self.pin_memory,
                          persistent_workers=self.num_workers > 0 and split in ("train", "val"))

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self):
        return self._loader("val", shuffle=False) if "val" in self.datasets else []

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("predict", shuffle=False)
