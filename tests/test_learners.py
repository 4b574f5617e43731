"""ANIL, Meta-SGD, Prototypical and Matching Networks in float64 against references that share no
code with distmeta's algorithms: central finite differences of the meta-objective and per-task
autograd loops written from the papers' equations (ANIL, Meta-SGD), and hand-written per-task,
per-query loops (ProtoNets, Matching Networks; FCE against ``torch.nn.LSTM``). Every
implementation is checked (vmap and loop on Conv4 with BatchNorm on batch statistics; ANIL and
Meta-SGD also on an MLP, with batched)."""

import pytest
import torch
import torch.nn.functional as F
from test_gradients import minibatch
from torch.func import functional_call

from distmeta.algorithms import build_algorithm
from distmeta.config import AlgorithmConfig, ModelConfig
from distmeta.models import DataSpec, build_model

WAYS, SHOTS, QUERIES = 3, 2, 3
# batched runs linear layers as batched matrix products: the MLP only (conv4 rejects it); threads
# splits a chunk's tasks over torch threads (with one it is the loop): two at least, in every test here
MODEL_IMPLEMENTATIONS = [
    *[("mlp", i) for i in ("vmap", "loop", "batched", "threads")],
    *[("conv4", i) for i in ("vmap", "loop", "threads")],
]
pytestmark = pytest.mark.usefixtures("two_torch_threads")


def setup(model_name="conv4", num_tasks=3, head=True, seed=0):
    """A float64 model and ``num_tasks`` random 3-way episodes (shot-major support, as TaskBatch)."""
    torch.manual_seed(seed)
    if model_name == "mlp":
        model = build_model(ModelConfig(name="mlp", hidden=[8, 8]), DataSpec((1,), 1))
        sx, qx = torch.rand(num_tasks, 5, 1) * 10 - 5, torch.rand(num_tasks, 7, 1) * 10 - 5
        tasks = (sx, torch.sin(sx) * 2, qx, torch.sin(qx) * 2)
        return model.double(), tuple(t.double() for t in tasks), F.mse_loss, "regression"
    model = build_model(ModelConfig(name="conv4", filters=4), DataSpec((1, 16, 16), WAYS if head else 0))
    sx = torch.rand(num_tasks, WAYS * SHOTS, 1, 16, 16, dtype=torch.float64)
    qx = torch.rand(num_tasks, WAYS * QUERIES, 1, 16, 16, dtype=torch.float64)
    sy = torch.arange(WAYS).repeat(SHOTS).expand(num_tasks, -1)  # shot-major: 0 1 2 0 1 2, as TaskBatch
    qy = torch.arange(WAYS).repeat_interleave(QUERIES).expand(num_tasks, -1)
    return model.double(), (sx, sy, qx, qy), F.cross_entropy, "classification"


def named(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def flat(d):
    return torch.cat([v.reshape(-1) for v in d.values()])


def rel(a, b):
    return ((flat(a) - flat(b)).norm() / flat(b).norm()).item()


def check_finite_differences(objective, params, gradient, directions=3, eps=1e-6):
    """``gradient`` against central differences of ``objective`` along random unit directions."""
    g = flat(gradient)
    generator = torch.Generator().manual_seed(1)
    for _ in range(directions):
        direction = torch.randn(g.shape, generator=generator, dtype=torch.float64)
        direction /= direction.norm()
        offsets = dict(zip(params, torch.split(direction, [p.numel() for p in params.values()])))
        shifted = [{n: p + sign * eps * offsets[n].view(p.shape) for n, p in params.items()} for sign in (1, -1)]
        numeric = (objective(shifted[0]) - objective(shifted[1])) / (2 * eps)
        analytic = (g @ direction).item()
        assert abs(numeric - analytic) <= 1e-7 * max(1.0, abs(numeric)), (numeric, analytic)


# --- ANIL -------------------------------------------------------------------------------------


def anil_meta_loss(model, theta, tasks, loss_fn, lr, steps, create_graph, batch=0):
    """Sum over tasks of the query loss after ``steps`` SGD steps on the head's weights alone, each
    step a full forward of the plain model (the body's parameters held at theta)."""
    head_names = [n for n in theta if n.startswith("head.")]
    total = 0.0
    for sx, sy, qx, qy in zip(*tasks):
        params = dict(theta)
        for step in range(steps):
            bx, by = minibatch(sx, sy, step, batch)
            loss = loss_fn(functional_call(model, params, (bx,)), by)
            grads = torch.autograd.grad(loss, [params[n] for n in head_names], create_graph=create_graph)
            params |= {n: params[n] - lr * g for n, g in zip(head_names, grads)}
        total = total + loss_fn(functional_call(model, params, (qx,)), qy)
    return total


@pytest.mark.parametrize("model_name, implementation", MODEL_IMPLEMENTATIONS)
def test_anil_meta_gradient_matches_finite_differences_and_a_plain_loop(model_name, implementation):
    model, tasks, loss_fn, kind = setup(model_name)
    lr, steps = (0.05, 2) if model_name == "mlp" else (0.4, 2)
    theta = named(model)
    algorithm = build_algorithm(AlgorithmConfig(name="anil", inner_lr=lr, inner_steps=steps), model, kind)
    meta_grad, metrics = algorithm.batch_update(theta, tasks, implementation)

    leaf = {n: p.clone().requires_grad_() for n, p in theta.items()}
    objective = anil_meta_loss(model, leaf, tasks, loss_fn, lr, steps, create_graph=True)
    reference = dict(zip(leaf, torch.autograd.grad(objective, list(leaf.values()))))
    assert rel(meta_grad, reference) < 1e-9
    assert metrics["loss_after"] == pytest.approx(objective.item(), rel=1e-10)

    def value(params):
        params = {n: p.requires_grad_() for n, p in params.items()}
        return anil_meta_loss(model, params, tasks, loss_fn, lr, steps, create_graph=False).item()

    check_finite_differences(value, theta, meta_grad)
    # The body's gradient is not zero: it flows through the features, not through the inner loop.
    assert flat({n: g for n, g in meta_grad.items() if n.startswith("features.")}).norm() > 1e-3


@pytest.mark.parametrize("name", ["anil", "metasgd"])
@pytest.mark.parametrize("implementation", ["vmap", "loop", "batched"])
def test_anil_and_metasgd_on_mini_batches_of_the_support_set_match_a_plain_loop(name, implementation):
    """algorithm.inner_batch_size: each inner step on the next mini-batch of the support set, wrapping
    around. On the MLP (no batch statistics) ANIL's features computed once and sliced are exactly the
    plain model run on each mini-batch."""
    model, tasks, loss_fn, kind = setup("mlp")
    cfg = AlgorithmConfig(name=name, inner_lr=0.05, inner_steps=3, inner_batch_size=2)
    algorithm = build_algorithm(cfg, model, kind)
    theta = algorithm.initial_parameters()
    meta_grad, _ = algorithm.batch_update(theta, tasks, implementation)
    leaf = {n: p.clone().requires_grad_() for n, p in theta.items()}
    if name == "anil":
        objective = anil_meta_loss(model, leaf, tasks, loss_fn, 0.05, 3, create_graph=True, batch=2)
    else:
        objective = metasgd_meta_loss(model, leaf, tasks, loss_fn, 3, create_graph=True, batch=2)
    reference = dict(zip(leaf, torch.autograd.grad(objective, list(leaf.values()))))
    assert rel(meta_grad, reference) < 1e-10
    whole = build_algorithm(AlgorithmConfig(name=name, inner_lr=0.05, inner_steps=3), model, kind)
    assert rel(whole.batch_update(theta, tasks, implementation)[0], reference) > 1e-3  # the batches mattered


def test_anil_evaluation_adapts_only_the_head():
    model, tasks, loss_fn, kind = setup()
    theta = named(model)
    algorithm = build_algorithm(AlgorithmConfig(name="anil", inner_lr=0.4, inner_steps=1), model, kind)
    trajectory = algorithm.batch_trajectory(theta, tasks, steps=2)
    for steps in range(3):
        leaf = {n: p.clone().requires_grad_() for n, p in theta.items()}
        for t, task in enumerate(zip(*tasks)):
            single = tuple(x[None] for x in task)
            expected = anil_meta_loss(model, leaf, single, loss_fn, 0.4, steps, create_graph=False).item()
            assert trajectory["loss"][t, steps].item() == pytest.approx(expected, rel=1e-10)


# --- Meta-SGD ---------------------------------------------------------------------------------


def metasgd_meta_loss(model, theta, tasks, loss_fn, steps, create_graph, batch=0):
    """Sum over tasks of the query loss after ``steps`` steps of theta - alpha * grad (elementwise)."""
    weights = [n for n in theta if not n.startswith("inner_lr.")]
    total = 0.0
    for sx, sy, qx, qy in zip(*tasks):
        params = {n: theta[n] for n in weights}
        for step in range(steps):
            bx, by = minibatch(sx, sy, step, batch)
            loss = loss_fn(functional_call(model, params, (bx,)), by)
            grads = torch.autograd.grad(loss, list(params.values()), create_graph=create_graph)
            params = {n: params[n] - theta[f"inner_lr.{n}"] * g for n, g in zip(weights, grads)}
        total = total + loss_fn(functional_call(model, params, (qx,)), qy)
    return total


@pytest.mark.parametrize("model_name, implementation", MODEL_IMPLEMENTATIONS)
def test_metasgd_meta_gradient_matches_finite_differences_and_a_plain_loop(model_name, implementation):
    model, tasks, loss_fn, kind = setup(model_name)
    lr = 0.05 if model_name == "mlp" else 0.3
    algorithm = build_algorithm(AlgorithmConfig(name="metasgd", inner_lr=lr, inner_steps=2), model, kind)
    theta = algorithm.initial_parameters()
    assert set(theta) == set(named(model)) | {f"inner_lr.{n}" for n in named(model)}
    assert all((theta[f"inner_lr.{n}"] == lr).all() for n in named(model))
    generator = torch.Generator().manual_seed(2)  # rates that differ per entry, so each entry is checked
    theta = {
        n: p * (0.5 + torch.rand(p.shape, generator=generator, dtype=p.dtype)) if n.startswith("inner_lr.") else p
        for n, p in theta.items()
    }
    meta_grad, _ = algorithm.batch_update(theta, tasks, implementation)

    leaf = {n: p.clone().requires_grad_() for n, p in theta.items()}
    objective = metasgd_meta_loss(model, leaf, tasks, loss_fn, 2, create_graph=True)
    assert rel(meta_grad, dict(zip(leaf, torch.autograd.grad(objective, list(leaf.values()))))) < 1e-9

    def value(params):
        params = {n: p.requires_grad_() for n, p in params.items()}
        return metasgd_meta_loss(model, params, tasks, loss_fn, 2, create_graph=False).item()

    check_finite_differences(value, theta, meta_grad)
    assert flat({n: g for n, g in meta_grad.items() if n.startswith("inner_lr.")}).norm() > 1e-6


# --- Prototypical Networks --------------------------------------------------------------------


def protonet_reference(model, theta, tasks, ways=WAYS):
    """(sum of query losses, sum of accuracies) by hand, one task and one class at a time."""
    total_loss, total_accuracy = 0.0, 0.0
    for sx, sy, qx, qy in zip(*tasks):
        embedded = functional_call(model, theta, (torch.cat([sx, qx]),))  # one batch per episode
        support, query = embedded[: len(sx)], embedded[len(sx) :]
        prototypes = [support[sy == c].mean(0) for c in range(ways)]
        logits = torch.stack([-((query - p) ** 2).sum(1) for p in prototypes], 1)
        total_loss = total_loss + F.cross_entropy(logits, qy)
        total_accuracy += (logits.argmax(1) == qy).double().mean().item()
    return total_loss, total_accuracy


@pytest.mark.parametrize("implementation", ["vmap", "loop", "threads"])
def test_protonet_loss_and_gradient_match_a_hand_loop(implementation):
    model, tasks, _, kind = setup(head=False)
    theta = named(model)
    algorithm = build_algorithm(AlgorithmConfig(name="protonet"), model, kind)
    grads, metrics = algorithm.batch_update(theta, tasks, implementation)
    leaf = {n: p.clone().requires_grad_() for n, p in theta.items()}
    loss, accuracy = protonet_reference(model, leaf, tasks)
    assert rel(grads, dict(zip(leaf, torch.autograd.grad(loss, list(leaf.values()))))) < 1e-10
    assert metrics["loss"] == pytest.approx(loss.item(), rel=1e-12)
    assert metrics["accuracy"] == pytest.approx(accuracy)


def test_protonet_scores_episodes_of_other_ways():
    """Parameters trained on 3-way episodes score a 2-way one: nothing depends on the ways."""
    model, tasks, _, kind = setup(head=False)
    algorithm = build_algorithm(AlgorithmConfig(name="protonet"), model, kind)
    sx, sy, qx, qy = tasks
    keep_support, keep_query = sy[0] < 2, qy[0] < 2
    two_way = (sx[:, keep_support], sy[:, keep_support], qx[:, keep_query], qy[:, keep_query])
    scores = algorithm.batch_trajectory(named(model), two_way, steps=0)
    loss, _ = protonet_reference(model, named(model), two_way, ways=2)
    assert scores["loss"].sum().item() == pytest.approx(loss.item(), rel=1e-12)


# --- Matching Networks ------------------------------------------------------------------------


def full_context_reference(theta, support, query, steps):
    """The FCE of one episode with ``torch.nn.LSTM`` (bidirectional) and a per-query loop."""
    dim = support.shape[1]
    bidirectional = torch.nn.LSTM(dim, dim, bidirectional=True).double()
    lstm_weights = {}
    for cell, suffix in (("forward_cell", ""), ("backward_cell", "_reverse")):
        for kind in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            lstm_weights[f"{kind}_l0{suffix}"] = theta[f"fce.{cell}.{kind}"]
    outputs, _ = functional_call(bidirectional, lstm_weights, (support[:, None],))  # [S, 1, 2D]
    g = support + outputs[:, 0, :dim] + outputs[:, 0, dim:]
    cell = torch.nn.LSTMCell(dim, dim).double()
    cell_weights = {k: theta[f"fce.attention_cell.{k}"] for k in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")}
    refined = []
    for f in query:
        h_hat, c = torch.zeros(dim, dtype=f.dtype), torch.zeros(dim, dtype=f.dtype)
        for _ in range(steps):
            h = h_hat + f
            attention = torch.softmax(g @ h, 0)
            readout = (attention[:, None] * g).sum(0)
            h_hat, c = functional_call(cell, cell_weights, (f[None], ((h + readout)[None], c[None])))
            h_hat, c = h_hat[0], c[0]
        refined.append(h_hat + f)
    return g, torch.stack(refined)


def matchingnet_reference(model, theta, tasks, fce_steps):
    """Sum of query losses -log sum_{i: y_i = y} softmax_i(cos(f(x), g(x_i))), one query at a time."""
    weights = {n: p for n, p in theta.items() if not n.startswith("fce.")}
    total = 0.0
    for sx, sy, qx, qy in zip(*tasks):
        embedded = functional_call(model, weights, (torch.cat([sx, qx]),))
        support, query = embedded[: len(sx)], embedded[len(sx) :]
        if fce_steps:
            support, query = full_context_reference(theta, support, query, fce_steps)
        for f, label in zip(query, qy):
            cosine = torch.stack([(f @ s) / (f.norm() * s.norm()) for s in support])
            attention = torch.exp(cosine) / torch.exp(cosine).sum()
            total = total - torch.log(attention[sy == label].sum()) / len(qy)
    return total


@pytest.mark.parametrize("fce", [False, True])
@pytest.mark.parametrize("implementation", ["vmap", "loop", "threads"])
def test_matchingnet_loss_and_gradient_match_a_hand_loop(fce, implementation):
    model, tasks, _, kind = setup(head=False)
    algorithm = build_algorithm(AlgorithmConfig(name="matchingnet", fce=fce, fce_steps=3), model, kind)
    theta = algorithm.initial_parameters()
    assert any(n.startswith("fce.") for n in theta) == fce
    grads, metrics = algorithm.batch_update(theta, tasks, implementation)
    leaf = {n: p.clone().requires_grad_() for n, p in theta.items()}
    loss = matchingnet_reference(model, leaf, tasks, 3 if fce else 0)
    reference = dict(zip(leaf, torch.autograd.grad(loss, list(leaf.values()))))
    assert rel(grads, reference) < 1e-10
    assert metrics["loss"] == pytest.approx(loss.item(), rel=1e-12)
    if fce:  # the LSTMs are learned: their gradient is there and not negligible
        assert flat({n: g for n, g in grads.items() if n.startswith("fce.")}).norm() > 1e-3 * flat(grads).norm()


# --- evaluation protocol: non-transductive batch statistics -----------------------------------


@pytest.mark.parametrize("name, steps", [("maml", 0), ("maml", 1), ("anil", 1), ("protonet", 0)])
def test_non_transductive_scores_each_query_with_the_support_set_alone(name, steps):
    model, tasks, _, kind = setup(head=name != "protonet")
    theta = named(model)
    algorithm = build_algorithm(AlgorithmConfig(name=name, inner_lr=0.4), model, kind)
    transductive = algorithm.batch_trajectory(theta, tasks, steps=steps)
    alone = algorithm.batch_trajectory(theta, tasks, steps=steps, transductive=False)
    assert not torch.allclose(transductive["loss"], alone["loss"])  # batch statistics do matter here
    for t, (sx, sy, qx, qy) in enumerate(zip(*tasks)):
        params = {n: p.clone().requires_grad_() for n, p in theta.items()}
        adapted = [n for n in params if name == "maml" or n.startswith("head.")]
        for _ in range(steps):  # the inner steps by hand, on the support set as one batch
            grads = torch.autograd.grad(
                F.cross_entropy(functional_call(model, params, (sx,)), sy), [params[n] for n in adapted]
            )
            params |= {n: (params[n] - 0.4 * g).detach() for n, g in zip(adapted, grads)}
        losses = []
        for q in range(len(qx)):
            batch = torch.cat([sx, qx[q : q + 1]])
            with torch.no_grad():
                if name == "protonet":
                    embedded = functional_call(model, params, (batch,))
                    prototypes = torch.stack([embedded[:-1][sy == c].mean(0) for c in range(WAYS)])
                    logits = -((embedded[-1] - prototypes) ** 2).sum(1)
                else:
                    logits = functional_call(model, params, (batch,))[-1]
            losses.append(F.cross_entropy(logits[None], qy[q : q + 1]))
        assert alone["loss"][t, steps].item() == pytest.approx(torch.stack(losses).mean().item(), rel=1e-10)
