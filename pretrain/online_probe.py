"""The online linear probe: a classifier on the query encoder's pooled features, trained beside MoCo.

It reads representation quality every epoch without a separate pass (solo-learn and lightly do the same; their
users find it tracks the offline linear probe). It changes nothing MoCo learns:
- the features are taken by a pre-hook on the query encoder's head (its input is the pooled, flattened
  feature of the query view) and detached;
- it has an optimizer of its own, and its step runs after MoCo's;
- its weights start at zero and BN draws nothing, so building it takes nothing from torch's generator: a run
  draws the same key shuffles and views with or without it.
BN without affine on the features (as MAE's probe) makes one lr fit any feature scale. Its top-1 is measured on
each batch before the probe trains on it: a running held-out estimate on the training stream.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from moco_transfer import distributed as du

PROBE_LR = 0.1
PROBE_MOMENTUM = 0.9
CHECKPOINT_KEY = "online_probe"  # its own key: the official tools read only `state_dict`


def dataset_classes(dataset: Any) -> list[str]:
    """The class names of a pretraining set (empty for an unlabelled folder or list)."""
    for obj in (dataset, getattr(dataset, "dataset", None)):
        classes = getattr(obj, "classes", None)
        if classes:
            return list(classes)
    return []


class OnlineProbe(nn.Module):
    """BN (no affine) + linear on `feature_dim` features; `step(targets)` after each MoCo step."""

    def __init__(self, head: nn.Module, feature_dim: int, num_classes: int, device: torch.device) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.norm = nn.BatchNorm1d(feature_dim, affine=False)
        self.fc = nn.Linear(feature_dim, num_classes)
        nn.init.zeros_(self.fc.weight)
        nn.init.zeros_(self.fc.bias)
        self.to(device)
        self.optimizer = torch.optim.SGD(self.parameters(), lr=PROBE_LR, momentum=PROBE_MOMENTUM)
        self._features: torch.Tensor | None = None
        self._hook = head.register_forward_pre_hook(self._take)

    def _take(self, _module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        # The first call of a step is the query view (a symmetric loss calls the encoder again for the key view).
        if self._features is None:
            self._features = args[0].detach()

    def step(self, targets: torch.Tensor) -> torch.Tensor:
        """Score the captured features against `targets` (-1: unlabelled, skipped), then train on them.

        Returns [correct, labelled] of this batch as a device tensor (no host sync).
        """
        feats, self._features = self._features, None
        if feats is None:
            raise RuntimeError("online probe: the query encoder's head did not run in this step")
        targets = targets.to(feats.device, non_blocking=True)
        labelled = targets >= 0
        self.train()
        with torch.autocast(feats.device.type, enabled=False):
            logits = self.fc(self.norm(feats.float()))
            weights = labelled.float()
            per_sample = F.cross_entropy(logits, targets.clamp(min=0), reduction="none")
            loss = (per_sample * weights).sum() / weights.sum().clamp(min=1.0)
        correct = ((logits.argmax(dim=1) == targets) & labelled).sum()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if du.is_distributed():  # one probe on every rank: average its gradients as DDP does the encoder's
            for p in self.parameters():
                dist.all_reduce(p.grad)
                p.grad /= du.world_size()
        self.optimizer.step()
        return torch.stack([correct.float(), labelled.sum().float()])

    def discard(self) -> None:
        """Forget features captured outside a training step (a forward that is not followed by `step`)."""
        self._features = None

    def remove(self) -> None:
        self._hook.remove()

    def checkpoint_state(self) -> dict[str, Any]:
        return {"num_classes": self.num_classes, "module": self.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_checkpoint_state(self, state: dict[str, Any]) -> bool:
        """Restore a saved probe; False (left fresh) when it was made for another number of classes."""
        if int(state.get("num_classes", -1)) != self.num_classes:
            return False
        self.load_state_dict(state["module"])
        self.optimizer.load_state_dict(state["optimizer"])
        return True
