"""Weighted kNN classification and class-label retrieval metrics on L2-normalised features.

The vote is the InstDisc/DINO protocol: the top-k neighbours by cosine similarity s vote for their class
with weight exp(s / T). Retrieval: recall@k is the share of queries with at least one same-class image among
their k nearest neighbours; AP ranks the whole gallery by similarity (relevant = same class).
"""

from __future__ import annotations

import torch

from .faiss_index import FaissGallery, faiss_available
from .progress import progress as progress_bar


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
    sims, idx = torch_search(train_features, query_features, k, chunk_size)
    return knn_vote(sims, train_labels.to(idx.device)[idx], num_classes, temperature)


def knn_vote(similarities: torch.Tensor, neighbour_labels: torch.Tensor, num_classes: int,
             temperature: float = 0.07) -> torch.Tensor:
    """Scores from each query's neighbours: weights exp(s / T) summed per class."""
    weights = (similarities / temperature).exp()
    scores = torch.zeros(similarities.shape[0], num_classes, dtype=weights.dtype, device=weights.device)
    return scores.scatter_add_(1, neighbour_labels, weights)


def topk_correct(scores: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> dict[int, int]:
    """Rows whose label is among the k highest scores, per k: counts, which add up over batches and ranks."""
    top = scores.topk(min(max(ks), scores.shape[1]), dim=1).indices
    hit = top == labels.view(-1, 1)
    return {k: int(hit[:, :k].any(dim=1).sum()) for k in ks}


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> dict[int, float]:
    """topk_correct in percent of the rows (NaN for none)."""
    rows = len(labels) or float("nan")
    return {k: 100.0 * n / rows for k, n in topk_correct(scores, labels, ks).items()}


@torch.no_grad()
def torch_search(gallery: torch.Tensor, queries: torch.Tensor, k: int, chunk_size: int = 1024
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k by inner product with matmul + topk, `chunk_size` queries at a time."""
    k = min(k, gallery.shape[0])
    sims, idx = [], []
    for start in range(0, queries.shape[0], chunk_size):
        s, i = (queries[start:start + chunk_size] @ gallery.T).topk(k, dim=1)
        sims.append(s)
        idx.append(i)
    return torch.cat(sims), torch.cat(idx)


def search_neighbours(gallery: torch.Tensor, queries: torch.Tensor, k: int, backend: str = "auto",
                      batch_size: int = 4096) -> tuple[torch.Tensor, torch.Tensor, str]:
    """Top-k neighbours with FAISS ("faiss", or "auto" when installed) or torch; returns the backend used."""
    if backend not in ("auto", "faiss", "torch"):
        raise ValueError(f"backend {backend!r}: expected auto, faiss or torch")
    if backend == "faiss" or (backend == "auto" and faiss_available()):
        index = FaissGallery(gallery)
        sims, idx = index.search(queries, k, batch_size, progress="kNN search")
        return sims, idx, "faiss-gpu" if index.on_gpu else "faiss-cpu"
    sims, idx = torch_search(gallery, queries, k, batch_size)
    return sims, idx, "torch"


def knn_classification(neighbour_sims: torch.Tensor, neighbour_labels: torch.Tensor, query_labels: torch.Tensor,
                       num_classes: int, ks: tuple[int, ...] = (10, 20, 100, 200), temperature: float = 0.07
                       ) -> dict[int, dict[str, float]]:
    """Top-1/top-5 of the weighted vote for every k, from one search at max(ks) (neighbours sorted)."""
    out = {}
    for k in ks:
        if k > neighbour_sims.shape[1]:
            raise ValueError(f"k={k} but only {neighbour_sims.shape[1]} neighbours were searched")
        scores = knn_vote(neighbour_sims[:, :k], neighbour_labels[:, :k], num_classes, temperature)
        acc = topk_accuracy(scores, query_labels, (1, 5))
        out[k] = {"top1": acc[1], "top5": acc[5]}
    return out


def recall_at_k(neighbour_labels: torch.Tensor, query_labels: torch.Tensor, ks: tuple[int, ...] = (1, 5, 10)
                ) -> dict[int, float]:
    """Percent of queries with a same-class gallery item among their k nearest neighbours."""
    hit = neighbour_labels == query_labels.view(-1, 1)
    return {k: 100.0 * hit[:, :k].any(dim=1).float().mean().item() for k in ks}


def average_precision(relevant: torch.Tensor) -> torch.Tensor:
    """AP of each row of a ranked relevance matrix (Q x N, best first): mean precision at each relevant hit.

    Rows without any relevant item get NaN so the caller can exclude them explicitly.
    """
    rel = relevant.float()
    hits = rel.cumsum(dim=1)
    ranks = torch.arange(1, rel.shape[1] + 1, dtype=rel.dtype, device=rel.device)
    total = rel.sum(dim=1)
    ap = (hits / ranks * rel).sum(dim=1) / total
    return torch.where(total > 0, ap, torch.full_like(ap, float("nan")))


@torch.no_grad()
def mean_average_precision(gallery: torch.Tensor, gallery_labels: torch.Tensor, queries: torch.Tensor,
                           query_labels: torch.Tensor, chunk_size: int = 256, depth: int | None = None,
                           progress: str | None = None) -> tuple[float, int]:
    """mAP (percent) of the queries against the gallery ranked by inner product, and the queries scored.

    `depth=None` ranks the full gallery (exact, memory chunk_size x N); a depth truncates each ranking to its
    top `depth` items (mAP@depth, normalised by min(relevant, depth)) for galleries too large to sort.
    Queries whose class is absent from the gallery are left out.
    """
    total, counted = 0.0, 0
    class_count = torch.bincount(gallery_labels, minlength=int(max(gallery_labels.max(), query_labels.max())) + 1)
    starts = range(0, queries.shape[0], chunk_size)
    for start in progress_bar(starts, desc=progress, leave=False, unit="chunk", disable=progress is None):
        sims = queries[start:start + chunk_size] @ gallery.T
        labels = query_labels[start:start + chunk_size]
        if depth is None:
            order = sims.argsort(dim=1, descending=True, stable=True)
        else:
            order = sims.topk(min(depth, gallery.shape[0]), dim=1).indices
        rel = gallery_labels[order] == labels.view(-1, 1)
        if depth is None:
            ap = average_precision(rel)
        else:
            n_rel = class_count[labels].clamp(max=rel.shape[1]).float()
            hits = rel.float().cumsum(dim=1)
            ranks = torch.arange(1, rel.shape[1] + 1, dtype=torch.float32)
            ap = (hits / ranks * rel.float()).sum(dim=1) / n_rel
            ap = torch.where(n_rel > 0, ap, torch.full_like(ap, float("nan")))
        valid = ~ap.isnan()
        total += ap[valid].sum().item()
        counted += int(valid.sum())
    return (100.0 * total / counted if counted else float("nan")), counted
