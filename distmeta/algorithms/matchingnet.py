"""Matching Networks (Vinyals et al., 2016): a query's class distribution is an attention over the
support set, P(y | x, S) = sum_i softmax_i(cos(f(x), g(x_i))) onehot(y_i).

With ``algorithm.fce`` (full context embeddings, the paper's appendix) the embeddings see the whole
support set: g is a bidirectional LSTM over the support embeddings plus a skip connection, and f is
an LSTM that attends over g for ``algorithm.fce_steps`` steps. The attention LSTM's state update
follows Knagg's reading of the appendix (his few-shot reproduction): h = h_hat + f'(x), and the
readout r is added to h rather than concatenated with it."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from distmeta.algorithms.metric import MetricAlgorithm
from distmeta.config import AlgorithmConfig, ConfigError

PREFIX = "fce."


class FullContextEmbedding(nn.Module):
    def __init__(self, dim: int, steps: int):
        super().__init__()
        self.steps = steps
        self.forward_cell, self.backward_cell = nn.LSTMCell(dim, dim), nn.LSTMCell(dim, dim)
        self.attention_cell = nn.LSTMCell(dim, dim)

    def forward(self, support: Tensor, query: Tensor) -> tuple[Tensor, Tensor]:
        """support [T, S, D], query [T, Q, D] -> (g, f), the same shapes."""
        (tasks, shots, dim), queries = support.shape, query.shape[1]
        zeros = support.new_zeros(tasks, dim)
        forward, backward, ahead, behind = [], [], (zeros, zeros), (zeros, zeros)
        for i in range(shots):
            ahead = self.forward_cell(support[:, i], ahead)
            behind = self.backward_cell(support[:, shots - 1 - i], behind)
            forward.append(ahead[0])
            backward.append(behind[0])
        g = support + torch.stack(forward, 1) + torch.stack(backward[::-1], 1)

        embedded = query.reshape(tasks * queries, dim)
        h_hat = cell = embedded.new_zeros(tasks * queries, dim)
        for _ in range(self.steps):
            h = h_hat + embedded
            attention = (h.view(tasks, queries, dim) @ g.transpose(1, 2)).softmax(-1)  # [T, Q, S]
            readout = (attention @ g).reshape(tasks * queries, dim)
            h_hat, cell = self.attention_cell(embedded, (h + readout, cell))
        return g, (h_hat + embedded).view(tasks, queries, dim)


class MatchingNetworks(MetricAlgorithm):
    reads = ("fce", "fce_steps")

    @classmethod
    def check(cls, cfg, kind):
        super().check(cfg, kind)
        if not cfg.algorithm.fce and cfg.algorithm.fce_steps != AlgorithmConfig().fce_steps:
            raise ConfigError(
                f"algorithm.fce_steps={cfg.algorithm.fce_steps} sets the full context embeddings' attention steps: "
                "add algorithm.fce=true, or leave it at its default"
            )

    def __init__(self, cfg, model, kind):
        super().__init__(cfg, model, kind)
        reference = next(model.parameters())
        self.fce = FullContextEmbedding(model.feature_dim, cfg.fce_steps).to(reference) if cfg.fce else None

    def initial_parameters(self):
        params = super().initial_parameters()
        if self.fce is not None:
            params |= {PREFIX + n: p.detach() for n, p in self.fce.named_parameters()}
        return params

    def logits(self, theta, support, one_hot, query):
        if self.fce is not None:
            weights = {n.removeprefix(PREFIX): p for n, p in theta.items() if n.startswith(PREFIX)}
            support, query = functional_call(self.fce, weights, (support, query))
        cosine = F.normalize(query, dim=-1) @ F.normalize(support, dim=-1).transpose(1, 2)  # [T, Q, S]
        # the attention and its log in at least float32: under bf16 autocast a matrix product would
        # round each class's probability to 8 bits before the log the loss takes
        wide = torch.promote_types(cosine.dtype, torch.float32)
        with torch.autocast(cosine.device.type, enabled=False):
            probabilities = cosine.to(wide).softmax(-1) @ one_hot.to(wide)  # [T, Q, ways]
        return probabilities.log()  # log P: cross-entropy on it is -log P(y | x, S)
