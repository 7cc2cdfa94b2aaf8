"""The MoCo model: query encoder, momentum key encoder, queue of negative keys, InfoNCE logits.

The constructor and forward keep the interface of the official MoCo builder
(`MoCo(base_encoder, dim, K, m, T, mlp)`, `forward(im_q, im_k) -> logits, labels`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from . import distributed as du
from .backbone import add_head_norm, add_mlp_head


class MoCo(nn.Module):
    def __init__(
        self,
        base_encoder: Callable[..., nn.Module],
        dim: int = 128,
        K: int = 65536,
        m: float = 0.999,
        T: float = 0.07,
        mlp: bool = False,
        symmetric: bool = False,
        head_norm: Callable[[int], nn.Module] | None = None,
    ) -> None:
        """`head_norm(dim)`, when given, makes a norm layer that ends both heads (e.g. `HeadBatchNorm`)."""
        super().__init__()
        self.K, self.m, self.T, self.symmetric = K, m, T, symmetric
        self.encoder_q = base_encoder(num_classes=dim)
        self.encoder_k = base_encoder(num_classes=dim)
        if mlp:
            add_mlp_head(self.encoder_q)
            add_mlp_head(self.encoder_k)
        if head_norm is not None:
            add_head_norm(self.encoder_q, head_norm(dim))
            add_head_norm(self.encoder_k, head_norm(dim))
        for param_q, param_k in zip(self.encoder_q.parameters(), self.encoder_k.parameters(), strict=True):
            param_k.data.copy_(param_q.data)
            param_k.requires_grad = False
        self.register_buffer("queue", F.normalize(torch.randn(dim, K), dim=0))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))
        self._params_q = list(self.encoder_q.parameters())
        self._params_k = list(self.encoder_k.parameters())
        # Host copy of queue_ptr: reading the buffer every step would wait for the GPU (a sync per step).
        self._host_ptr: int | None = None
        self.register_load_state_dict_post_hook(lambda module, _keys: setattr(module, "_host_ptr", None))

    def _apply(self, fn, recurse=True):  # noqa: ANN001 - keeps the cached parameter lists valid after .to()
        out = super()._apply(fn, recurse)
        self._params_q = list(self.encoder_q.parameters())
        self._params_k = list(self.encoder_k.parameters())
        return out

    @torch.no_grad()
    def momentum_update_key_encoder(self) -> None:
        """k <- m * k + (1 - m) * q for every parameter, as one fused multi-tensor op."""
        torch._foreach_lerp_(self._params_k, self._params_q, 1.0 - self.m)

    @torch.no_grad()
    def dequeue_and_enqueue(self, keys: torch.Tensor) -> None:
        keys = du.concat_all_gather(keys).to(self.queue.dtype)
        batch_size = keys.shape[0]
        if self._host_ptr is None:
            self._host_ptr = int(self.queue_ptr)
        ptr = self._host_ptr
        if self.K % batch_size:
            raise ValueError(f"queue size K={self.K} must be a multiple of the global batch {batch_size}")
        self.queue[:, ptr:ptr + batch_size] = keys.T
        self._host_ptr = (ptr + batch_size) % self.K
        self.queue_ptr.fill_(self._host_ptr)

    @torch.no_grad()
    def _shuffle(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Permute the key batch (across all ranks when distributed); returns the slice and the inverse."""
        if not du.is_distributed():
            perm = torch.randperm(x.shape[0], device=x.device)
            return x[perm], torch.argsort(perm)
        local = x.shape[0]
        x_all = du.concat_all_gather(x)
        perm = torch.randperm(x_all.shape[0], device=x.device)
        dist.broadcast(perm, src=0)
        mine = perm.view(du.world_size(), local)[du.rank()]
        return x_all[mine], torch.argsort(perm)

    @torch.no_grad()
    def _unshuffle(self, k: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
        if not du.is_distributed():
            return k[inverse]
        local = k.shape[0]
        k_all = du.concat_all_gather(k)[inverse]
        return k_all[du.rank() * local:(du.rank() + 1) * local]

    def _encode_keys(self, im_k: torch.Tensor) -> torch.Tensor:
        """Keys of the (batch-shuffled) key views; the key encoder must already be momentum-updated."""
        shuffled, inverse = self._shuffle(im_k)
        return self._unshuffle(F.normalize(self.encoder_k(shuffled), dim=1), inverse)

    def _logits(self, q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor) -> torch.Tensor:
        q, k = q.float(), k.float()
        l_pos = torch.einsum("nc,nc->n", q, k).unsqueeze(-1)
        l_neg = q @ queue
        return torch.cat([l_pos, l_neg], dim=1) / self.T

    def forward(self, im_q: torch.Tensor, im_k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """InfoNCE logits (positive first) and labels (zeros).

        Symmetric (the MoCo authors' CIFAR demo option): each view is also a query for the other's key, so
        the rows of both directions are stacked (2N rows; their mean cross-entropy is the mean of the two
        losses) and both key batches enter the queue, which must then hold a multiple of 2N.
        """
        q = F.normalize(self.encoder_q(im_q), dim=1)
        with torch.no_grad():
            self.momentum_update_key_encoder()
            k = self._encode_keys(im_k)
        queue = self.queue.clone().detach()  # the negatives as they were before this step's keys go in
        if not self.symmetric:
            logits = self._logits(q, k, queue)
            self.dequeue_and_enqueue(k)
        else:
            q2 = F.normalize(self.encoder_q(im_k), dim=1)
            with torch.no_grad():
                k2 = self._encode_keys(im_q)
            logits = torch.cat([self._logits(q, k, queue), self._logits(q2, k2, queue)], dim=0)
            self.dequeue_and_enqueue(torch.cat([k, k2], dim=0))
        labels = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
        return logits, labels
