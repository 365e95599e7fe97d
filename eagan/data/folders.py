"""An image folder: class sub-folders make a conditional dataset, loose images an
unconditional one."""

from __future__ import annotations

from pathlib import Path

from eagan.data.image_set import ImageFiles
from eagan.data.images import IMAGE_EXTENSIONS, images_under, is_image
from eagan.errors import UserError


def find_folder(root: Path) -> ImageFiles:
    if not root.is_dir():
        raise UserError(f"image folder {root} does not exist")
    entries = sorted(p for p in root.iterdir() if not p.name.startswith("."))
    class_dirs = [p for p in entries if p.is_dir()]
    loose = [p for p in entries if is_image(p)]
    if not class_dirs:
        if not loose:
            raise UserError(f"image folder {root} holds no images "
                            f"({', '.join(IMAGE_EXTENSIONS)}) and no class sub-folders")
        return ImageFiles(loose, [0] * len(loose), 0, [], str(root))
    if loose:
        raise UserError(f"image folder {root} mixes class sub-folders with loose images such as "
                        f"{loose[0].name}; move the images into class folders or remove them")
    paths, labels = [], []
    for label, class_dir in enumerate(class_dirs):
        found = images_under(class_dir)
        if not found:
            raise UserError(f"class folder {class_dir} holds no images "
                            f"({', '.join(IMAGE_EXTENSIONS)})")
        paths.extend(found)
        labels.extend([label] * len(found))
    return ImageFiles(paths, labels, len(class_dirs), [p.name for p in class_dirs], str(root))
