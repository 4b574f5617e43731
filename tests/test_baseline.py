"""The transfer-learning baseline in float64 against references that share no code with distmeta's
algorithms: its pre-training gradient against a per-episode autograd loop and central finite
differences, the class labels its episodes carry against the images, and its test-time head (the
nearest-centroid classifier at 0 steps, SGD from there on) against a hand-written loop."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_runtime import in_process, saved_params, small
from torch.func import functional_call

from distmeta.algorithms import build_algorithm, initial_parameters
from distmeta.assemble import check_run
from distmeta.checkpoint import step_name
from distmeta.config import AlgorithmConfig, ConfigError, ModelConfig, load_config
from distmeta.models import DataSpec, build_model, cosine_scores
from distmeta.resume import prepare_resume
from distmeta.tasks import build_source, task_rng
from distmeta.train import train

CLASSES, WAYS, SHOTS, QUERIES = 7, 3, 2, 3


def episodes(num_tasks=2, seed=0):
    """Random 3-way episodes whose labels are training-class indices in [0, 7)."""
    generator = torch.Generator().manual_seed(seed)
    sx = torch.rand(num_tasks, WAYS * SHOTS, 1, 16, 16, dtype=torch.float64, generator=generator)
    qx = torch.rand(num_tasks, WAYS * QUERIES, 1, 16, 16, dtype=torch.float64, generator=generator)
    classes = torch.stack([torch.randperm(CLASSES, generator=generator)[:WAYS] for _ in range(num_tasks)])
    sy = classes[:, torch.arange(WAYS).repeat(SHOTS)]
    qy = classes[:, torch.arange(WAYS).repeat_interleave(QUERIES)]
    return sx, sy, qx, qy


def learner(finetune="head", head_init="centroid", lr=0.2, head="linear"):
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="conv4", filters=4, head=head), DataSpec((1, 16, 16), CLASSES)).double()
    cfg = AlgorithmConfig(name="baseline", inner_lr=lr, finetune=finetune, head_init=head_init)
    return build_algorithm(cfg, model, "classification")


def scores_by_hand(features, weight, bias=None, norm=None):
    """A linear head's scores, or (a norm per class, no bias) Baseline++'s: s g_c cos(f, v_c), s = 2
    for up to 200 classes."""
    if norm is None:
        return features @ weight.T + bias
    unit = lambda v: v / torch.sqrt((v * v).sum(-1, keepdim=True))  # noqa: E731
    return 2.0 * norm * (unit(features) @ unit(weight).T)


def features_by_hand(model, params, x):
    return functional_call(model.features, {n.removeprefix("features."): p for n, p in params.items()}, (x,))


@pytest.mark.parametrize("implementation, head", [("vmap", "linear"), ("loop", "linear"), ("vmap", "cosine")])
def test_pretraining_gradient_is_the_cross_entropy_over_every_class_of_every_image(implementation, head):
    baseline = learner(head=head)
    theta = {n: p.detach().clone() for n, p in baseline.model.named_parameters()}
    assert ("head.bias" in theta) == (head == "linear") != ("head.norm" in theta)
    tasks = episodes()

    def objective(params):  # each episode (support and query images) one batch, as its batch statistics
        total = 0.0
        body = {n: p for n, p in params.items() if n.startswith("features.")}
        for sx, sy, qx, qy in zip(*tasks):
            features = features_by_hand(baseline.model, body, torch.cat([sx, qx]))
            logits = scores_by_hand(features, params["head.weight"], params.get("head.bias"), params.get("head.norm"))
            total = total + F.cross_entropy(logits, torch.cat([sy, qy]))
        return total

    params = {n: p.clone().requires_grad_() for n, p in theta.items()}
    expected = dict(zip(params, torch.autograd.grad(objective(params), list(params.values()))))
    update, metrics = baseline.batch_update(theta, tasks, implementation)
    for name in theta:
        torch.testing.assert_close(update[name], expected[name], rtol=1e-9, atol=1e-12, msg=name)
    assert metrics["loss"] == pytest.approx(objective(theta).item(), rel=1e-12)
    generator = torch.Generator().manual_seed(1)
    for _ in range(3):  # and along random directions, by central differences
        direction = {n: torch.randn(p.shape, dtype=torch.float64, generator=generator) for n, p in theta.items()}
        eps = 1e-6
        plus = objective({n: p + eps * direction[n] for n, p in theta.items()})
        minus = objective({n: p - eps * direction[n] for n, p in theta.items()})
        analytic = sum((update[n] * direction[n]).sum() for n in theta)
        assert analytic.item() == pytest.approx(((plus - minus) / (2 * eps)).item(), rel=1e-6)


def reference_head_steps(model, theta, tasks, steps, lr, finetune, head_init, cosine=False):
    """Per task, by hand: the class centroids of the support features as a linear head (2c, -|c|^2)
    or a cosine one (directions c / |c|, norms 1), or a zero head, then ``steps`` SGD steps of the
    support cross-entropy on the head (or on everything), then the query accuracy and loss."""
    accuracies, losses = [], []
    for sx, sy, qx, qy in zip(*tasks):
        body = {n: p for n, p in theta.items() if n.startswith("features.")}

        def features(params, x):
            return features_by_hand(model, {n: p for n, p in params.items() if n.startswith("features.")}, x)

        support = features(body, sx)
        centroids = torch.stack([support[sy == c].mean(0) for c in range(int(sy.max()) + 1)])
        if cosine:
            unit = centroids / centroids.norm(dim=1, keepdim=True)
            weights = {**body, "w": unit, "g": torch.ones_like(centroids[:, 0])}
        else:
            weights = {**body, "w": 2 * centroids, "b": -(centroids**2).sum(1)}
        if head_init == "zero":
            weights |= {"w": torch.zeros_like(weights["w"]), "b": torch.zeros_like(weights["b"])}
        trained = [n for n in ("w", "b", "g") if n in weights] if finetune == "head" else list(weights)
        for _ in range(steps):
            current = {n: p.detach().requires_grad_(n in trained) for n, p in weights.items()}
            logits = scores_by_hand(features(current, sx), current["w"], current.get("b"), current.get("g"))
            loss = F.cross_entropy(logits, sy)
            grads = dict(zip(trained, torch.autograd.grad(loss, [current[n] for n in trained])))
            weights = {n: p - lr * grads[n] if n in grads else p for n, p in weights.items()}
        logits = scores_by_hand(features(weights, qx), weights["w"], weights.get("b"), weights.get("g"))
        accuracies.append((logits.argmax(1) == qy).double().mean())
        losses.append(F.cross_entropy(logits, qy).detach())
    return torch.stack(accuracies), torch.stack(losses)


@pytest.mark.parametrize(
    "finetune, head_init, head",
    [
        ("head", "centroid", "linear"),
        ("all", "centroid", "linear"),
        ("head", "zero", "linear"),
        ("head", "centroid", "cosine"),  # Baseline++
        ("all", "centroid", "cosine"),
    ],
)
def test_test_time_head_starts_at_the_nearest_centroid_and_follows_sgd(finetune, head_init, head):
    baseline = learner(finetune, head_init, head=head)
    theta = {n: p.detach().clone() for n, p in baseline.model.named_parameters()}
    sx, _, qx, _ = episodes(num_tasks=3, seed=2)
    sy = torch.arange(WAYS).repeat(SHOTS).expand(3, -1)  # test episodes: labels 0..ways-1
    qy = torch.arange(WAYS).repeat_interleave(QUERIES).expand(3, -1)
    tasks = (sx, sy, qx, qy)
    scores = baseline.batch_trajectory(theta, tasks, steps=4)
    for steps in (0, 1, 4):
        accuracy, loss = reference_head_steps(
            baseline.model, theta, tasks, steps, 0.2, finetune, head_init, cosine=head == "cosine"
        )
        torch.testing.assert_close(scores["accuracy"][:, steps], accuracy, msg=f"{steps} steps")
        torch.testing.assert_close(scores["loss"][:, steps], loss, rtol=1e-10, atol=1e-12, msg=f"{steps} steps")
    assert (scores["loss"][:, 4] != scores["loss"][:, 0]).all()  # the steps moved the head
    if head_init == "zero":  # a fresh head scores every class alike: the first class wins each query
        assert (scores["accuracy"][:, 0] == 1 / WAYS).all()
        return
    # at 0 steps the head is the nearest-centroid classifier: the ProtoNets rule on these features
    body = {n.removeprefix("features."): p for n, p in theta.items() if n.startswith("features.")}
    features = functional_call(baseline.model.features, body, (qx[0],))
    support = functional_call(baseline.model.features, body, (sx[0],))
    centroids = torch.stack([support[sy[0] == c].mean(0) for c in range(WAYS)])
    nearest = torch.cdist(features, centroids).argmin(1)
    if head == "cosine":  # nearest by angle
        nearest = (F.normalize(features, dim=1) @ F.normalize(centroids, dim=1).T).argmax(1)
    assert scores["accuracy"][0, 0].item() == pytest.approx((nearest == qy[0]).double().mean().item())


def test_baseline_plus_plus_scales_its_cosines_and_learns_a_norm_per_class_as_chen_et_al():
    """Their distLinear: s = 10 over Omniglot's 4,112 training classes, 2 over a test episode's ways,
    times a norm per class (weight normalisation), which starts at the norm of the class's weights."""
    features, weight = torch.randn(3, 8, dtype=torch.float64), torch.randn(4112, 8, dtype=torch.float64)
    norm = torch.rand(4112, dtype=torch.float64) + 0.5
    cosines = F.normalize(features, dim=1) @ F.normalize(weight, dim=1).T
    torch.testing.assert_close(cosine_scores(features, weight, norm), 10 * norm * cosines)
    torch.testing.assert_close(cosine_scores(features, weight[:5], norm[:5]), 2 * norm[:5] * cosines[:, :5])
    head = build_model(ModelConfig(name="conv4", head="cosine"), DataSpec((1, 28, 28), 4112)).head.double()
    torch.testing.assert_close(head.norm, head.weight.norm(dim=1))  # g starts at |v_c|, as weight norm does
    with torch.no_grad():
        head.norm.mul_(torch.rand(4112, dtype=torch.float64) + 0.5)  # and is a parameter of its own
    x = torch.randn(3, 64, dtype=torch.float64)  # Omniglot's Conv4 features: the pre-training head's scores
    unit = F.normalize(x, dim=1) @ F.normalize(head.weight, dim=1).T
    torch.testing.assert_close(head(x), 10 * head.norm * unit)
    assert [name for name, _ in head.named_parameters()] == ["weight", "norm"]


def test_training_episodes_carry_class_labels_and_test_episodes_do_not():
    cfg = load_config(
        None,
        [
            *("task.source=synthetic", "model.name=conv4", "task.labels=class", "algorithm.name=baseline"),
            *("task.num_classes=50", "task.image_size=8", "task.shots=2", "task.queries=3"),
        ],
    )
    source = build_source(cfg.task)
    assert source.spec.output_dim == 40  # one output per training class (a fifth held out)
    batch = source.sample(task_rng(0, "train", 0), 4, "train", 2, 3)
    templates = source.templates.reshape(50, -1)
    for x, y in ((batch.support_x, batch.support_y), (batch.query_x, batch.query_y)):
        nearest = ((x.reshape(*x.shape[:2], 1, -1) - templates) ** 2).sum(-1).argmin(-1)
        np.testing.assert_array_equal(nearest, y)  # each image is of the class its label names
    assert batch.support_y.max() >= WAYS  # global indices, not 0..ways-1
    test = source.sample(task_rng(0, "test", 0), 4, "test", 2, 3)
    assert sorted(np.unique(test.support_y)) == list(range(cfg.task.ways))


def test_labels_and_algorithms_must_agree():
    base = ["task.source=synthetic", "model.name=conv4"]
    with pytest.raises(ConfigError, match="algorithm.name=baseline pre-trains a classifier .* set task.labels=class"):
        check_run(load_config(None, [*base, "algorithm.name=baseline"]))
    with pytest.raises(ConfigError, match="task.labels=class labels images .* maml learns from episodes"):
        check_run(load_config(None, [*base, "task.labels=class"]))
    with pytest.raises(ConfigError, match="sinusoid is regression"):
        check_run(load_config(None, ["task.labels=class", "algorithm.name=baseline"]))
    ok = check_run(load_config(None, [*base, "task.labels=class", "algorithm.name=baseline", "eval.ways=4"]))
    assert ok.eval.ways == 4  # a new head at test: any number of ways
    plus_plus = [*base, "task.labels=class", "algorithm.name=baseline", "model.head=cosine"]
    with pytest.raises(ConfigError, match="a zero weight has no direction .* use algorithm.head_init=centroid"):
        check_run(load_config(None, [*plus_plus, "algorithm.head_init=zero"]))
    for learner_name in ("protonet", "maml"):  # metric learners have no head; the others are not checked with it
        with pytest.raises(ConfigError, match=f"Baseline.+'s classifier, for algorithm.name=baseline; {learner_name}"):
            check_run(load_config(None, [*base, f"algorithm.name={learner_name}", "model.head=cosine"]))


def test_the_baseline_pretrains_on_the_runtime_as_in_one_process_and_resumes_exactly(ray_local, tmp_path):
    """Pre-training through two workers and the parameter server, and the same run resumed from its
    middle checkpoint on one worker, equal the package's loop in one process (float64)."""
    cfg = small(
        *(
            "task.source=synthetic",
            "model.name=conv4",
            "model.filters=8",
            "model.downsample=stride",
            "task.image_size=8",
        ),
        *("task.num_classes=50", "task.labels=class", "algorithm.name=baseline", "algorithm.implementation=loop"),
        *("task.shots=2", "task.queries=3", "eval.shots=[1]", "eval.inner_steps=[0]", "eval.num_tasks=4"),
        *("train.steps=8", "train.checkpoint_every=4", "train.checkpoint_keep=0", "cluster.num_workers=2"),
    )
    expected, _ = in_process(cfg)
    assert not np.allclose(expected, initial_parameters(cfg, build_source(cfg.task)))
    result = train(cfg, tmp_path / "run")
    # atol 1e-10: the first convolution's biases, ahead of BatchNorm, have no gradient but rounding
    # (1e-17), which Adam scales to steps of 1e-11 whose sign depends on the order two workers' sums
    # ran in (one worker equals the loop exactly); a wrong gradient moves parameters by 1e-4 or more
    np.testing.assert_allclose(saved_params(result), expected, rtol=1e-10, atol=1e-10)
    middle = tmp_path / "run" / "checkpoints" / step_name(4)
    resumed_cfg, run_dir = prepare_resume(str(middle), ["cluster.num_workers=1"], {})
    resumed = train(resumed_cfg, run_dir, resume=True)
    np.testing.assert_allclose(saved_params(resumed), expected, rtol=1e-10, atol=1e-10)
