"""Batch sources: the only augmentation of the SAGAN recipe is a random horizontal flip. Both
sources draw their order and flips from one `_IndexStream`, so for one seed they give the same
batches, resume exactly from `state_dict()`, and split a global batch across ranks:

- order: the stream is the concatenation of random permutations of the dataset, one per epoch;
  every step takes the next `batch_size * world_size` indices, so a batch that reaches the end
  of a permutation is completed from the start of the next one (every image is used exactly
  once per epoch and no image is dropped).
- flips: after its indices, every step draws one flip decision per image of the global batch.
- distributed training: every rank uses the same seed and draws the same global batch; rank r
  keeps items [r * batch_size, (r + 1) * batch_size). Ranks never overlap, and together they
  see exactly the images and flips one rank with batch_size * world_size would see.
"""

from __future__ import annotations

from typing import Any, Iterator

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from eagan.data.image_set import ImageFiles, ImageSet
from eagan.data.images import decode_image
from eagan.errors import UserError


class _IndexStream:
    """Global batches of indices from epoch-wise random permutations, and their flips.

    One CPU generator drives everything, so the stream is the same on every device and rank.
    """

    def __init__(self, num_images: int, global_batch: int, seed: int, hflip: bool) -> None:
        self.num_images, self.global_batch, self.hflip = num_images, global_batch, hflip
        self.generator = torch.Generator().manual_seed(seed)
        self.epoch, self.position = 0, 0
        self.permutation = torch.randperm(num_images, generator=self.generator)

    def step(self) -> tuple[Tensor, Tensor | None]:
        """The next global batch: indices (G,) int64 and flips (G,) bool (None without hflip)."""
        parts, needed = [], self.global_batch
        while needed > 0:
            if self.position == self.num_images:  # start the next epoch's permutation
                self.permutation = torch.randperm(self.num_images, generator=self.generator)
                self.epoch, self.position = self.epoch + 1, 0
            taken = min(needed, self.num_images - self.position)
            parts.append(self.permutation[self.position:self.position + taken])
            self.position, needed = self.position + taken, needed - taken
        flips = (torch.rand(self.global_batch, generator=self.generator) < 0.5
                 if self.hflip else None)
        return torch.cat(parts), flips

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state(), "epoch": self.epoch,
                "position": self.position, "permutation": self.permutation.clone(),
                "num_images": self.num_images}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["num_images"] != self.num_images:
            raise UserError(f"the saved data order covers {state['num_images']} images but the "
                            f"dataset has {self.num_images}; resume with the same dataset")
        self.generator.set_state(state["generator"])
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self.permutation = state["permutation"].clone()


def _check_batching(batch_size: int, rank: int, world_size: int) -> None:
    if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need batch_size >= 1 and 0 <= rank < world_size, got batch_size "
                         f"{batch_size}, rank {rank}, world_size {world_size}")


def _to_float(images: Tensor, flips: Tensor | None) -> Tensor:
    """uint8 (B, 3, H, W) -> float32 in [-1, 1], images with flips[i] mirrored left-right."""
    x = images.float().div_(127.5).sub_(1.0)  # (B, 3, H, W)
    if flips is not None:
        mask = flips.to(x.device, non_blocking=True)[:, None, None, None]  # (B, 1, 1, 1)
        x = torch.where(mask, x.flip(3), x)
    return x


class DeviceBatchSource:
    """Endless batches from a dataset held whole on `device` (see the module docstring).

    batch_size is per rank. state_dict() holds the generator state, epoch, position and current
    permutation (tensors and ints only, loadable with torch.load(weights_only=True)); after
    load_state_dict the batches continue exactly, on any rank count.
    """

    def __init__(self, images: ImageSet, batch_size: int, seed: int,
                 device: torch.device | str, hflip: bool = True, rank: int = 0,
                 world_size: int = 1) -> None:
        _check_batching(batch_size, rank, world_size)
        self.device = torch.device(device)
        self.images = images.images.to(self.device)  # (N, 3, H, W) uint8
        self.labels = images.labels.to(self.device)  # (N,)
        self._stream = _IndexStream(len(self.images), batch_size * world_size, seed, hflip)
        self._mine = slice(rank * batch_size, (rank + 1) * batch_size)

    @property
    def epoch(self) -> int:
        """0-based index of the permutation the last batch ended in."""
        return self._stream.epoch

    def next(self) -> tuple[Tensor, Tensor]:
        """The next batch: images (B, 3, H, W) float32 in [-1, 1] and labels (B,) int64."""
        indices, flips = self._stream.step()
        mine = indices[self._mine].to(self.device)  # (B,)
        return (_to_float(self.images[mine], None if flips is None else flips[self._mine]),
                self.labels[mine])

    def state_dict(self) -> dict[str, Any]:
        return self._stream.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._stream.load_state_dict(state)


def make_batch_source(images: ImageSet, batch_size: int, seed: int, device: torch.device | str,
                      hflip: bool = True, rank: int = 0, world_size: int = 1) -> DeviceBatchSource:
    """The batch source for an in-memory dataset."""
    return DeviceBatchSource(images, batch_size, seed, device, hflip, rank, world_size)


class _FileDataset(Dataset):
    def __init__(self, files: ImageFiles, image_size: int, resize: bool) -> None:
        self.paths, self.labels, self.image_size = files.paths, files.labels, image_size
        self.resize = resize

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[Tensor, int, int]:
        image = torch.from_numpy(decode_image(self.paths[index], self.image_size, self.resize))
        return image.permute(2, 0, 1), self.labels[index], index  # (3, S, S) uint8


class _StreamSampler(Sampler[list[int]]):
    """Replays a copy of the index stream, from the state `start`, for the DataLoader to read
    ahead; yields this rank's indices of every global batch."""

    def __init__(self, stream: _IndexStream, mine: slice) -> None:
        self.stream, self.mine = stream, mine
        self.start = stream.state_dict()

    def __iter__(self) -> Iterator[list[int]]:
        replay = _IndexStream(self.stream.num_images, self.stream.global_batch, 0,
                              self.stream.hflip)
        replay.load_state_dict(self.start)
        while True:
            yield replay.step()[0][self.mine].tolist()


class LoaderBatchSource:
    """Endless batches decoded from files by DataLoader workers, for datasets too big for memory.

    Same interface, order, flips and state as DeviceBatchSource (for the same files, seed and
    image size both give identical batches). The DataLoader's sampler replays a copy of the index
    stream ahead of use, while the main process advances the real stream one step per batch, draws
    the flips and saves its state; so prefetching never leaks into state_dict().
    """

    def __init__(self, files: ImageFiles, image_size: int, batch_size: int, seed: int,
                 device: torch.device | str, hflip: bool = True, rank: int = 0,
                 world_size: int = 1, num_workers: int = 2, resize: bool = True) -> None:
        _check_batching(batch_size, rank, world_size)
        self.device = torch.device(device)
        self.num_workers = num_workers
        self._dataset = _FileDataset(files, image_size, resize)
        self._stream = _IndexStream(len(files.paths), batch_size * world_size, seed, hflip)
        self._mine = slice(rank * batch_size, (rank + 1) * batch_size)
        self._loader: DataLoader | None = None
        self._iterator: Iterator[tuple[Tensor, Tensor, Tensor]] | None = None

    @property
    def epoch(self) -> int:
        """0-based index of the permutation the last batch ended in."""
        return self._stream.epoch

    def next(self) -> tuple[Tensor, Tensor]:
        """The next batch: images (B, 3, H, W) float32 in [-1, 1] and labels (B,) int64."""
        if self._iterator is None:
            self._iterator = self._start()
        indices, flips = self._stream.step()
        try:
            images, labels, loaded = next(self._iterator)
        except UserError as error:  # from a worker it carries the worker's traceback: keep the line
            raise UserError(str(error).strip().splitlines()[-1]
                            .removeprefix(f"{UserError.__module__}.{UserError.__name__}: ")) \
                from None
        if not torch.equal(loaded, indices[self._mine]):
            raise RuntimeError("DataLoader batches fell out of step with the index stream")
        images = images.to(self.device, non_blocking=True)  # (B, 3, H, W) uint8
        return (_to_float(images, None if flips is None else flips[self._mine]),
                labels.to(self.device, non_blocking=True))

    def _start(self) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        """A DataLoader iterator whose first batch is the stream's next one."""
        if self._loader is None:
            self._sampler = _StreamSampler(self._stream, self._mine)
            self._loader = DataLoader(self._dataset, batch_sampler=self._sampler,
                                      num_workers=self.num_workers,
                                      pin_memory=self.device.type == "cuda",
                                      persistent_workers=self.num_workers > 0)
        else:
            self._sampler.start = self._stream.state_dict()
        return iter(self._loader)  # persistent workers are reused, their read-ahead dropped

    def state_dict(self) -> dict[str, Any]:
        return self._stream.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._stream.load_state_dict(state)
        self._iterator = None  # the read-ahead belongs to the old position

    def close(self) -> None:
        """Stop the workers now; a later next() starts new ones where the stream stands."""
        workers = getattr(self._loader, "_iterator", None)  # the persistent workers' iterator
        if workers is not None:
            # DataLoader has no public call for this; it is the one its own exit handler makes.
            # Dropping the iterator is not enough: after a worker's error its traceback keeps the
            # iterator alive until the garbage collector, whose arbitrary order of finalizers
            # can close the queues first and leave the workers 10 s to time out.
            workers._shutdown_workers()
        self._iterator = self._loader = None
