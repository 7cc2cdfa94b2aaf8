"""Weighted kNN classification on L2-normalised features (the InstDisc/DINO protocol)."""

from __future__ import annotations

import torch


@torch.no_grad()
def weighted_knn_predict(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    query_features: torch.Tensor,
    num_classes: int,
    k: int = 200,
    temperature: float = 0.07,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """Class scores (queries x classes): sum over the top-k neighbours of exp(cosine / temperature).

    Features must already be L2-normalised. Queries are processed in chunks to bound memory.
    """
    k = min(k, train_features.shape[0])
    scores = []
    for start in range(0, query_features.shape[0], chunk_size):
        sim = query_features[start:start + chunk_size] @ train_features.T
        top_sim, top_idx = sim.topk(k, dim=1)
        scores.append(knn_vote(top_sim, train_labels[top_idx], num_classes, temperature))
    return torch.cat(scores)


def knn_vote(similarities: torch.Tensor, neighbour_labels: torch.Tensor, num_classes: int,
             temperature: float = 0.07) -> torch.Tensor:
    """Scores from each query's neighbours: weights exp(s / T) summed per class."""
    weights = (similarities / temperature).exp()
    scores = torch.zeros(similarities.shape[0], num_classes, dtype=weights.dtype, device=weights.device)
    return scores.scatter_add_(1, neighbour_labels, weights)


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> dict[int, float]:
    """Percent of rows whose label is among the k highest scores."""
    top = scores.topk(min(max(ks), scores.shape[1]), dim=1).indices
    hit = top == labels.view(-1, 1)
    return {k: 100.0 * hit[:, :k].any(dim=1).float().mean().item() for k in ks}
