"""TaskBatch: the unit that flows from the task generator to the workers."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import NamedTuple

import numpy as np
import torch


@dataclass
class TaskBatch:
    """A batch of T tasks as numpy arrays with a leading task axis.

    Images travel as uint8 (4x smaller than float32); ``to_torch`` converts them on the worker's
    device. Numpy arrays inside the dataclass cross Ray's object store without copies.
    """

    support_x: np.ndarray  # [T, S, *input_shape]
    support_y: np.ndarray  # [T, S] class labels, or [T, S, out] regression targets
    query_x: np.ndarray  # [T, Q, *input_shape]
    query_y: np.ndarray
    produced_at: float = 0.0  # wall-clock time the generator finished it (for the data-wait metric)
    first_task: int = 0  # index of the first of these tasks in the step's meta-batch (for fault reports)
    draw: int = -1  # the meta-batch's index in the task stream: its tasks depend only on (seed, draw)

    @classmethod
    def from_episodes(cls, images: np.ndarray, shots: int, classes: np.ndarray | None = None) -> TaskBatch:
        """From images ``[T, N, K + Q, ...]`` (task, class, example): class i gets label i (or, with
        ``classes`` [T, N], label ``classes[t, i]``), the first ``shots`` examples of each class are
        the support set, the rest the query set. The support set is shot-major (example j is of
        class j mod N), so any run of N support examples holds one of each class: inner-loop
        mini-batches (``inner_batch_size``) cycle through it in order."""
        num_tasks, ways, per_class = images.shape[:3]
        classes = np.broadcast_to(np.arange(ways), (num_tasks, ways)) if classes is None else classes
        labels = np.broadcast_to(classes[:, :, None], (num_tasks, ways, per_class))

        def flat(a: np.ndarray, shot_major: bool) -> np.ndarray:  # [T, N, k, ...] -> [T, N*k, ...]
            a = a.swapaxes(1, 2) if shot_major else a
            return np.ascontiguousarray(a.reshape(num_tasks, a.shape[1] * a.shape[2], *a.shape[3:]))

        return cls(
            flat(images[:, :, :shots], True),
            flat(labels[:, :, :shots], True).astype(np.int64),
            flat(images[:, :, shots:], False),
            flat(labels[:, :, shots:], False).astype(np.int64),
        )

    def __len__(self) -> int:
        return len(self.support_x)

    def slice(self, start: int, stop: int) -> TaskBatch:
        return replace(
            self,
            first_task=self.first_task + start,
            support_x=self.support_x[start:stop],
            support_y=self.support_y[start:stop],
            query_x=self.query_x[start:stop],
            query_y=self.query_y[start:stop],
        )

    def to_torch(self, device: torch.device, dtype: torch.dtype) -> TaskTensors:
        """The tasks as tensors on ``device``; uint8 images scaled to [0, 1]."""
        arrays = (self.support_x, self.support_y, self.query_x, self.query_y)
        return TaskTensors(*(to_tensor(a, device, dtype) for a in arrays))


class TaskTensors(NamedTuple):
    """A chunk of T tasks as tensors, each [T, ...]: what the algorithms compute on (a tuple too:
    ``support_x, support_y, query_x, query_y = tasks``)."""

    support_x: torch.Tensor
    support_y: torch.Tensor
    query_x: torch.Tensor
    query_y: torch.Tensor

    def task(self, index: int) -> TaskTensors:
        """Task ``index`` alone, keeping the task axis (a view)."""
        return TaskTensors(*(t[index : index + 1] for t in self))


def to_tensor(array: np.ndarray, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """On a GPU: copied into pinned host memory (torch caches it) and from there asynchronously,
    as uint8 (a quarter of float32's bytes), converted on the device."""
    if device.type == "cuda":
        pinned = torch.empty(array.shape, dtype=_TORCH_DTYPES[array.dtype.str[1:]], pin_memory=True)
        pinned.numpy()[...] = array  # arrays from the object store are read-only: copy, do not wrap
        tensor = pinned.to(device, non_blocking=True)
    else:  # np.array(copy): torch wants writable arrays
        tensor = torch.from_numpy(np.array(array, copy=True))
    if tensor.dtype == torch.uint8:  # in place: a second image-sized allocation cost 8 ms a step in page faults
        return tensor.to(dtype).div_(255.0)
    if tensor.is_floating_point():
        return tensor.to(dtype)
    return tensor.long()


_TORCH_DTYPES = {"u1": torch.uint8, "i8": torch.int64, "f4": torch.float32, "f8": torch.float64}
