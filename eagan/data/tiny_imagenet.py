"""Tiny-ImageNet in its official layout (wnids.txt, train/<wnid>/images, val annotations)."""

from __future__ import annotations

from pathlib import Path

from eagan.data.image_set import ImageFiles
from eagan.data.images import is_image, read_text
from eagan.errors import UserError

TINY_IMAGENET_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
TINY_IMAGENET_FOLDER = "tiny-imagenet-200"


def find_tiny_imagenet(root: Path, split: str) -> ImageFiles:
    base = next((c for c in (root / TINY_IMAGENET_FOLDER, root) if (c / "wnids.txt").is_file()),
                None)
    if base is None:
        raise UserError(f"Tiny-ImageNet is not in {root} (no {TINY_IMAGENET_FOLDER}/wnids.txt): "
                        f"download {TINY_IMAGENET_URL} and unzip it in {root}")
    wnids = read_text(base / "wnids.txt").split()
    if not wnids or len(set(wnids)) != len(wnids):
        raise UserError(f"{base / 'wnids.txt'} must list distinct class ids (wnids), one a line")
    class_of = {wnid: i for i, wnid in enumerate(wnids)}
    paths, labels = [], []
    if split == "train":
        for wnid, label in class_of.items():
            found = sorted(p for p in (base / "train" / wnid / "images").glob("*")
                           if is_image(p))
            if not found:
                raise UserError(f"Tiny-ImageNet class folder {base / 'train' / wnid / 'images'} "
                                f"(class {wnid!r} of {base / 'wnids.txt'}) holds no images")
            paths.extend(found)
            labels.extend([label] * len(found))
    else:
        annotations = base / "val" / "val_annotations.txt"
        if not annotations.is_file():
            raise UserError(f"{annotations} is missing; unzip {TINY_IMAGENET_URL} again")
        for number, line in enumerate(read_text(annotations).splitlines(), start=1):
            if not line.strip():
                continue
            fields = line.split("\t")
            if len(fields) < 2 or fields[1] not in class_of:
                raise UserError(f"{annotations} line {number}: expected 'file<TAB>wnid<TAB>box' "
                                f"with a wnid from {base / 'wnids.txt'}, got {line[:80]!r}")
            paths.append(base / "val" / "images" / fields[0])
            labels.append(class_of[fields[1]])
        if not paths:
            raise UserError(f"{annotations} lists no images")
    return ImageFiles(paths, labels, len(wnids), wnids, str(base))
