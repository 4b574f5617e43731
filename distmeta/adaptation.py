"""Adapt a meta-trained checkpoint to your own few labelled images, then classify new ones.

``adapt(checkpoint, support_images, support_labels)`` returns a ``Predictor``. The images are
prepared as the checkpoint's training images were (``task.image_format``: channels, size, inversion,
scaling). The MAML family (MAML, first-order MAML, Reptile, ANIL, Meta-SGD) takes inner SGD steps
on the support set, as many as its evaluation takes (the most of ``eval.inner_steps``) unless told
otherwise, at its inner step size (Meta-SGD: its learned ones; ANIL: the head only); ProtoNets and
Matching Networks embed the support set and compare (no steps); the transfer baseline trains a new
head (``algorithm.head_init``, ``finetune``), as many steps as its evaluation takes. With fewer
classes than the head was trained for, the head's first rows serve them, as a training episode's
labels 0..n-1 did.

Predictions are not transductive: each query image goes through the network with the support set
alone, so with BatchNorm's batch statistics an image's prediction never depends on which other
images are classified with it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

import distmeta
from distmeta.algorithms import ALGORITHMS, build_learner
from distmeta.algorithms.base import one_query_at_a_time
from distmeta.checkpoint import read_checkpoint, version_key, writer_version
from distmeta.config import TEST_TIME_ALGORITHM_FIELDS, Config, ConfigError, ImageFormat, config_from_dict, load_config
from distmeta.data.images import UnreadableImage, decode, prepare
from distmeta.evaluate import eval_steps, trained_model_data
from distmeta.models import DataSpec
from distmeta.params import DTYPES, ParamLayout
from distmeta.runtime.worker import gpu_numerics_within
from distmeta.tasks import SOURCES
from distmeta.tasks.batch import TaskTensors, to_tensor

ImageInput = str | Path | Image.Image | np.ndarray  # a file, a decoded image, or its pixels (H x W [x C] uint8)
QUERY_CHUNK = 256  # query images per forward batch group


class AdaptError(ConfigError):
    """Input ``adapt`` cannot use; the message names it and the fix."""


@dataclasses.dataclass(frozen=True)
class Prediction:
    label: str  # the predicted class: one of the support labels
    probability: float  # the model's probability of that class


class Predictor:
    """A checkpoint adapted to one support set. ``predict`` and ``probabilities`` classify new images;
    ``state_dict`` and ``module`` give the adapted network where the learner adapts one."""

    def __init__(
        self,
        cfg: Config,
        learner,
        params: dict[str, Tensor],
        support: TaskTensors,
        classes: list[str],
        predict,
        steps: int = 0,
    ):
        self.cfg, self.learner, self.params, self.support, self.classes = cfg, learner, params, support, classes
        self.steps = steps  # inner steps taken on the support set
        self.image_format = cfg.task.image_format
        self._predict = predict  # images [1, N, ...] -> class scores [1, N, classes] (the adapted network), or None
        self.device, self.dtype = support.support_x.device, support.support_x.dtype

    @property
    def adaptive(self) -> bool:
        """Whether the network itself was adapted (the MAML family), rather than compared with the support set."""
        return self.learner.adaptive

    def probabilities(self, images: Sequence[ImageInput]) -> np.ndarray:
        """[len(images), classes]: each image's class probabilities, classes in ``self.classes`` order.
        Prepared a chunk at a time: a folder of many photos never sits in memory as one tensor."""
        if isinstance(images, (str, Path, Image.Image, np.ndarray)):
            images = [images]
        if not len(images):
            raise AdaptError("no query images to classify")
        chunks = [
            self._logits(to_tensor(_prepared(images[i : i + QUERY_CHUNK], self.image_format), self.device, self.dtype))
            for i in range(0, len(images), QUERY_CHUNK)
        ]
        return torch.softmax(torch.cat(chunks).double(), -1).cpu().numpy()

    def predict(self, images: Sequence[ImageInput]) -> list[Prediction]:
        """The most probable class of each image, with its probability."""
        probabilities = self.probabilities(images)
        best = probabilities.argmax(1)
        return [Prediction(self.classes[c], float(p[c])) for c, p in zip(best, probabilities)]

    def state_dict(self) -> dict[str, Tensor]:
        """The adapted network's parameters, as ``module()`` holds them (MAML family only)."""
        if not self.adaptive:
            raise AdaptError(
                f"{self.cfg.algorithm.name} adapts no network: it classifies by comparing embeddings with the "
                "support set, so there is no adapted model to save (the checkpoint's embedding is the model)"
            )
        return {name: self.params[name].detach().clone().cpu() for name in self.learner.model_names}

    def module(self) -> nn.Module:
        """A plain ``nn.Module`` (distmeta.models) holding the adapted parameters: outputs are class
        scores in ``self.classes`` order. Its BatchNorm uses batch statistics, as in training."""
        model = self.learner.model
        model.load_state_dict(self.state_dict())
        return model

    @torch.no_grad()
    def _logits(self, query_x: Tensor) -> Tensor:
        """[N, classes] for query images [N, ...], each scored with the support set alone."""
        support_x, support_y = self.support.support_x, self.support.support_y
        query_x = query_x[None]
        transductive = not type(self.learner.model).batch_norm  # no batch statistics: one batch is the same
        with device_numerics(self.cfg, self.device):
            if self._predict is None:
                dummy = torch.zeros(query_x.shape[:2], dtype=support_y.dtype, device=self.device)
                tasks = TaskTensors(support_x, support_y, query_x, dummy)
                return self.learner.query_logits(self.params, tasks, transductive)[0]
            if transductive:
                return self._predict(query_x)[0]
            return one_query_at_a_time(self._predict, support_x, query_x)[0]


def adapt(
    checkpoint: str | Path,
    support_images: Sequence[ImageInput],
    support_labels: Sequence,
    steps: int | None = None,
    device: str = "cpu",
    overrides: Sequence[str] = (),
    invert: bool | None = None,
) -> Predictor:
    """The checkpoint adapted to the labelled support images (at least one per class; the classes are
    the distinct labels, sorted by their text). ``steps``: inner steps for the MAML family and the
    baseline (default: as the checkpoint is evaluated, the most of its ``eval.inner_steps``: 3 for
    MAML on Omniglot, as the paper tests, 100 for the baseline); learners without an inner loop take
    none. ``overrides``: test-time algorithm settings, e.g. ``["algorithm.head_init=centroid"]``
    (``TEST_TIME_ALGORITHM_FIELDS``). ``invert``: whether to invert the images (255 - pixel); default:
    as the training images were (``task.image_format.invert``), for images whose files look like the
    training set's (Omniglot's: dark strokes on light); the opposite for images drawn the other way."""
    cfg, theta = _load(checkpoint, overrides)
    if invert is not None:  # the user's images are drawn the other way round from the training files
        fmt = dataclasses.replace(cfg.task.image_format, invert=invert)
        cfg = dataclasses.replace(cfg, task=dataclasses.replace(cfg.task, image_format=fmt))
    if len(support_images) != len(support_labels):
        raise AdaptError(f"{len(support_images)} support images but {len(support_labels)} labels: give one label each")
    classes = sorted({str(label) for label in support_labels})
    if not classes:
        raise AdaptError("no support images: give at least one labelled image per class")
    learner_class = ALGORITHMS[cfg.algorithm.name]
    if len(classes) < 2:
        raise AdaptError(f"one class ({classes[0]!r}) in the support set: a classifier needs at least two")
    if learner_class.uses_head and not learner_class.supervised and len(classes) > cfg.task.ways:
        raise AdaptError(
            f"{len(classes)} classes in the support set, but the checkpoint's head was trained for "
            f"{cfg.task.ways}-way episodes ({cfg.algorithm.name} has a head with that many outputs): use at most "
            f"{cfg.task.ways} classes, or a learner that tests without that head (protonet, matchingnet, baseline)"
        )
    if steps is None:
        steps = max(eval_steps(cfg)) if learner_class.adaptive else 0
    if steps < 0 or (steps and not learner_class.adaptive):
        raise AdaptError(
            f"--steps {steps}: "
            + ("must be 0 or more" if steps < 0 else f"{cfg.algorithm.name} has no inner loop; leave --steps out")
        )
    if not steps and learner_class.supervised and cfg.algorithm.head_init == "zero":
        evaluated = max(eval_steps(cfg))
        raise AdaptError(
            "--steps 0 with algorithm.head_init=zero: a new head at zero gives every class the same probability; "
            + (f"take steps (this checkpoint is evaluated after {evaluated}), or " if evaluated else "")
            + "start the head at the class centroids (algorithm.head_init=centroid)"
        )
    dtype = DTYPES[cfg.train.dtype]
    device = torch.device(device)
    labels = [classes.index(str(label)) for label in support_labels]
    order = _one_shot_of_each_class_first(labels)
    x = to_tensor(_prepared([support_images[i] for i in order], cfg.task.image_format), device, dtype)[None]
    y = torch.tensor([labels[i] for i in order], device=device)[None]
    support = TaskTensors(x, y, x[:, :0], y[:, :0])
    learner = _learner(cfg, len(classes), device, dtype)
    params = _for_classes(ParamLayout.of(learner.initial_parameters()), theta, len(classes), cfg, device, dtype)
    if not learner.adaptive:
        return Predictor(cfg, learner, params, support, classes, predict=None)
    with device_numerics(cfg, device):
        theta = {n: p.requires_grad_() for n, p in params.items()}
        loop = learner.inner_loop(theta, support)
        adapted = loop.params
        if steps:
            adapted = learner.adapted(
                loop, support.support_y, steps, create_graph=False, batch_size=cfg.eval.inner_batch_size
            )
        adapted = {n: p.detach() for n, p in adapted.items()}
    if not all(torch.isfinite(p).all() for p in adapted.values()):
        raise AdaptError(f"adaptation diverged (non-finite parameters after {steps} inner steps): use fewer --steps")
    model_params = {n: p.detach() for n, p in params.items()}
    for name, value in adapted.items():  # ANIL's loop names the head's parameters without "head."
        model_params[name if name in model_params else f"head.{name}"] = value[0]
    return Predictor(cfg, learner, model_params, support, classes, functools.partial(loop.predict, adapted), steps)


def device_numerics(cfg: Config, device: torch.device):
    """On a GPU, float32 as the checkpoint was trained and evaluated (``gpu_numerics``), for the block
    alone: the calling program's own settings come back after it."""
    return gpu_numerics_within(cfg.train) if device.type == "cuda" else contextlib.nullcontext()


def _load(checkpoint: str | Path, overrides: Sequence[str]) -> tuple[Config, Tensor]:
    """The checkpoint's config (with the test-time ``overrides``) and flat parameters, once it is
    known to be one ``adapt`` can use."""
    bad = [o for o in overrides if not o.startswith(TEST_TIME_ALGORITHM_FIELDS)]
    if bad:
        raise AdaptError(
            f"adapt's settings are the test-time {', '.join(f.rstrip('=') for f in TEST_TIME_ALGORITHM_FIELDS)}, "
            f"got {bad}: the rest of the config is the checkpoint's"
        )
    state = read_checkpoint(checkpoint)
    written_by = writer_version(state)
    if version_key(written_by) > version_key(distmeta.__version__):
        raise AdaptError(
            f"checkpoint {checkpoint} was written by distmeta {written_by}, newer than this one "
            f"({distmeta.__version__}): upgrade distmeta (pip install -U distmeta) to adapt it"
        )
    try:
        cfg = config_from_dict(state["config"])
    except ConfigError as err:
        raise AdaptError(
            f"checkpoint {checkpoint} was written by distmeta {written_by}, whose config this version "
            f"({distmeta.__version__}) cannot read ({err}); adapt it with distmeta {written_by}"
        ) from None
    if cfg.algorithm.name not in ALGORITHMS:
        from distmeta.rl.setup import is_meta_rl  # here: meta-RL's setup is not needed to adapt classifiers

        raise AdaptError(
            f"checkpoint {checkpoint} is a {cfg.algorithm.name} policy (meta-RL): adapt classifies images; "
            "score an RL checkpoint with `distmeta evaluate --checkpoint ...`"
            if is_meta_rl(cfg)
            else f"checkpoint {checkpoint} names algorithm.name={cfg.algorithm.name}, which this version "
            f"({distmeta.__version__}) does not have; adapt it with distmeta {written_by}, which wrote it"
        )
    if cfg.task.source not in SOURCES:
        raise AdaptError(
            f"checkpoint {checkpoint} names task.source={cfg.task.source}, which this version "
            f"({distmeta.__version__}) does not have; adapt it with distmeta {written_by}, which wrote it"
        )
    if SOURCES[cfg.task.source].kind != "classification":
        raise AdaptError(
            f"checkpoint {checkpoint} was trained on {cfg.task.source} ({SOURCES[cfg.task.source].kind}); "
            "adapt classifies images: use a checkpoint trained on image classification (shards, synthetic)"
        )
    if not cfg.task.image_format.channels:
        cfg = _with_recorded_format(cfg, checkpoint, written_by)
    if overrides:
        if not ALGORITHMS[cfg.algorithm.name].supervised:
            raise AdaptError(
                f"{', '.join(overrides)}: test-time settings of the transfer baseline; {cfg.algorithm.name} has none"
            )
        cfg = load_config(None, list(overrides), base=cfg.to_dict())
        try:  # a setting the trained model cannot take (a zero start for a cosine head)
            ALGORITHMS[cfg.algorithm.name].check(cfg, "classification")
        except ConfigError as err:
            raise AdaptError(str(err)) from None
    return cfg, state["params"]


def _with_recorded_format(cfg: Config, checkpoint, written_by: str) -> Config:
    """A checkpoint from before checkpoints recorded their image format: the format its shards' manifest
    gives, if the shards are still where it was trained."""
    try:
        fmt = SOURCES[cfg.task.source].from_config(cfg.task).image_format
    except (ConfigError, ValueError, OSError) as err:
        raise AdaptError(
            f"checkpoint {checkpoint} (distmeta {written_by}) does not record how its training images were "
            f"prepared, and its data at task.shards={cfg.task.shards} cannot tell ({err}); put the shards "
            "back there, or retrain with this version, whose checkpoints record it"
        ) from None
    return dataclasses.replace(cfg, task=dataclasses.replace(cfg.task, image_format=fmt))


def _learner(cfg: Config, num_classes: int, device: torch.device, dtype: torch.dtype):
    fmt = cfg.task.image_format
    spec = DataSpec(input_shape=(fmt.channels, fmt.height, fmt.width), output_dim=num_classes)
    return build_learner(cfg, spec, "classification", device, dtype)


def _for_classes(
    layout: ParamLayout, theta: Tensor, num_classes: int, cfg: Config, device: torch.device, dtype: torch.dtype
) -> dict[str, Tensor]:
    """The checkpoint's parameters for a head of ``num_classes`` outputs: its first rows (a training
    episode's labels 0..n-1 used them; the baseline replaces them), Meta-SGD's learned rates for
    them alike."""
    try:
        spec, kind = trained_model_data(cfg, theta.numel())
        full = build_learner(cfg, spec, kind, torch.device("cpu"), dtype)
        named = ParamLayout.of(full.initial_parameters()).unflatten(theta.to(dtype))
    except (ConfigError, ValueError) as err:
        raise AdaptError(
            f"the checkpoint's parameters do not fit the model its config describes ({err}): re-export it from its run"
        ) from None
    params = {}
    for name, shape in layout.shapes.items():
        if name not in named:  # an exported baseline keeps no head over its training classes: it makes a new one
            params[name] = torch.zeros(shape, device=device, dtype=dtype)
            continue
        value = named[name]
        if tuple(value.shape) != shape:  # a head's weight or bias (or its learned rates): keep the first rows
            value = value[: shape[0]]
        params[name] = value.to(device).clone()
    return params


def _one_shot_of_each_class_first(labels: list[int]) -> list[int]:
    """Indices of ``labels`` in shot-major order (one example of each class, then the next), the
    order the inner loop's mini-batches expect (see ``MetaAlgorithm.adapt``)."""
    seen: dict[int, int] = {}
    rank = []
    for label in labels:
        rank.append(seen.get(label, 0))
        seen[label] = rank[-1] + 1
    return sorted(range(len(labels)), key=lambda i: (rank[i], labels[i]))


def _prepared(images: Sequence[ImageInput], fmt: ImageFormat) -> np.ndarray:
    """Images as the checkpoint's training shards stored theirs: [N, C, H, W] uint8 (``to_tensor``
    scales them to [0, 1] in the model's dtype, as a worker does)."""
    arrays = []
    for i, image in enumerate(images):
        if isinstance(image, (str, Path)):
            try:
                image = decode(str(image), Path(image).read_bytes())
            except OSError as err:
                raise AdaptError(f"cannot read image {image}: {err.strerror or err}") from None
            except UnreadableImage as err:
                raise AdaptError(str(err)) from None
        elif isinstance(image, np.ndarray):
            if image.ndim == 3 and image.shape[2] == 1:  # H x W x 1: grayscale
                image = image[:, :, 0]
            if image.dtype != np.uint8 or not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] in (3, 4))):
                raise AdaptError(
                    f"image {i} is an array of {image.dtype} {image.shape}; give uint8 pixels, H x W or H x W x C "
                    "with C 1, 3 or 4 (channels last: transpose a C x H x W array)"
                )
            image = Image.fromarray(image)
        elif not isinstance(image, Image.Image):
            raise AdaptError(f"image {i} is a {type(image).__name__}; give a file path, a PIL image or a uint8 array")
        try:
            arrays.append(prepare(image, fmt))
        except (ValueError, OSError) as err:  # a mode Pillow cannot convert (LAB, ...), float pixels
            raise AdaptError(f"image {i} cannot be prepared as {fmt.channels} channel(s) ({err})") from None
    return np.stack(arrays)
