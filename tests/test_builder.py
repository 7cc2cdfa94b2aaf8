"""The MoCo module: queue arithmetic, momentum update, InfoNCE logits, shuffle, split BN."""

from __future__ import annotations

from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from moco_transfer.backbone import HeadBatchNorm, SplitBatchNorm, add_mlp_head, build_resnet
from moco_transfer.builder import MoCo


class LinearEncoder(nn.Module):
    """A flat linear map with an `fc`, the smallest thing that behaves like a base encoder."""

    def __init__(self, num_classes: int = 4) -> None:
        super().__init__()
        self.fc = nn.Linear(6, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1))


def tiny_moco(**kwargs) -> MoCo:
    torch.manual_seed(0)
    return MoCo(LinearEncoder, **{"dim": 4, "K": 8, "m": 0.9, "T": 0.5, **kwargs})


def test_queue_is_normalised_and_wraps_around():
    model = tiny_moco()
    assert torch.allclose(model.queue.norm(dim=0), torch.ones(8))
    keys = [F.normalize(torch.randn(4, 4), dim=1) for _ in range(3)]
    model.dequeue_and_enqueue(keys[0])
    assert int(model.queue_ptr) == 4
    assert torch.equal(model.queue[:, :4], keys[0].T)
    model.dequeue_and_enqueue(keys[1])
    assert int(model.queue_ptr) == 0
    model.dequeue_and_enqueue(keys[2])
    assert int(model.queue_ptr) == 4
    assert torch.equal(model.queue[:, :4], keys[2].T)
    assert torch.equal(model.queue[:, 4:], keys[1].T)


def test_queue_rejects_batch_that_does_not_divide_k():
    model = tiny_moco()
    with pytest.raises(ValueError, match="multiple of the global batch 3"):
        model.dequeue_and_enqueue(torch.randn(3, 4))


def test_momentum_update_matches_formula_and_key_encoder_has_no_grad():
    model = tiny_moco(m=0.75)
    assert all(not p.requires_grad for p in model.encoder_k.parameters())
    assert torch.equal(model.encoder_q.fc.weight, model.encoder_k.fc.weight)
    with torch.no_grad():
        model.encoder_q.fc.weight.add_(1.0)
    before_k = model.encoder_k.fc.weight.clone()
    q = model.encoder_q.fc.weight.clone()
    model.momentum_update_key_encoder()
    assert torch.allclose(model.encoder_k.fc.weight, 0.75 * before_k + 0.25 * q)


def test_logits_and_loss_match_hand_computation():
    model = tiny_moco(m=0.0, T=0.5)  # m=0: the key encoder becomes the query encoder before the key forward
    model.eval()
    x = torch.randn(4, 6)
    queue = model.queue.clone()
    logits, labels = model(x, x)
    q = F.normalize(model.encoder_q(x), dim=1)
    expected = torch.cat([(q * q).sum(1, keepdim=True), q @ queue], dim=1) / 0.5
    assert logits.shape == (4, 9)
    assert torch.allclose(logits, expected, atol=1e-6)
    assert torch.allclose(logits[:, 0], torch.full((4,), 2.0), atol=1e-6)  # q.q / T = 1 / 0.5
    assert torch.equal(labels, torch.zeros(4, dtype=torch.long))
    loss = F.cross_entropy(logits, labels)
    hand = sum(-expected[i, 0] + torch.log(expected[i].exp().sum()) for i in range(4)) / 4
    assert torch.allclose(loss, hand, atol=1e-6)
    assert torch.allclose(model.queue[:, :4], q.T, atol=1e-6)  # this batch's keys were enqueued


def test_only_query_encoder_receives_gradients():
    model = tiny_moco()
    logits, labels = model(torch.randn(4, 6), torch.randn(4, 6))
    F.cross_entropy(logits, labels).backward()
    assert model.encoder_q.fc.weight.grad is not None
    assert all(p.grad is None for p in model.encoder_k.parameters())


def test_shuffle_and_unshuffle_are_inverse():
    model = tiny_moco()
    x = torch.arange(32.0).view(16, 2)
    shuffled, inverse = model._shuffle(x)
    assert not torch.equal(shuffled, x)
    assert torch.equal(model._unshuffle(shuffled, inverse), x)


def test_split_batchnorm_equals_bn_per_sub_batch():
    torch.manual_seed(0)
    x = torch.randn(8, 3, 5, 5)
    split = SplitBatchNorm(3, num_splits=2)
    with torch.no_grad():
        split.weight.copy_(torch.tensor([1.0, 2.0, 0.5]))
        split.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
    halves = []
    for i in range(2):
        bn = nn.BatchNorm2d(3)
        bn.load_state_dict({k: v for k, v in split.state_dict().items()})
        halves.append((bn(x[i::2]), bn.running_mean.clone(), bn.running_var.clone()))
    out = split(x)
    assert torch.allclose(out[0::2], halves[0][0], atol=1e-5)  # sub-batch j holds samples j, j + s, ...
    assert torch.allclose(out[1::2], halves[1][0], atol=1e-5)
    assert torch.allclose(split.running_mean, (halves[0][1] + halves[1][1]) / 2, atol=1e-6)
    assert torch.allclose(split.running_var, (halves[0][2] + halves[1][2]) / 2, atol=1e-6)
    split.eval()
    plain = nn.BatchNorm2d(3)
    plain.load_state_dict(split.state_dict())
    plain.eval()
    assert torch.allclose(split(x), plain(x))
    with pytest.raises(ValueError, match="not divisible by num_splits=2"):
        split.train()(x[:3])


def test_split_bn_keeps_plain_bn_keys():
    a = build_resnet("resnet18", num_classes=8, bn_splits=4).state_dict()
    b = build_resnet("resnet18", num_classes=8).state_dict()
    assert a.keys() == b.keys()


def test_mlp_head_layout_matches_official_keys():
    model = MoCo(partial(build_resnet, "resnet50"), dim=128, K=256, mlp=True)
    sd = model.state_dict()
    assert sd["encoder_q.fc.0.weight"].shape == (2048, 2048)
    assert sd["encoder_q.fc.2.weight"].shape == (128, 2048)
    assert isinstance(model.encoder_q.fc[1], nn.ReLU)
    assert sd["queue"].shape == (128, 256) and sd["queue_ptr"].shape == (1,)
    v1 = MoCo(partial(build_resnet, "resnet18"), dim=128, K=256, mlp=False).state_dict()
    assert v1["encoder_q.fc.weight"].shape == (128, 512)


def test_head_bn_centres_each_sub_batch_and_keeps_the_official_head_keys():
    """BN without affine ends both heads; per sub-batch every output dimension has mean 0 and variance 1."""
    model = MoCo(partial(build_resnet, "resnet18", small_images=True, bn_splits=2), dim=16, K=32, mlp=True,
                 head_norm=partial(HeadBatchNorm, num_splits=2))
    sd = model.state_dict()
    assert sd["encoder_q.fc.0.weight"].shape == (512, 512) and sd["encoder_q.fc.2.weight"].shape == (16, 512)
    assert "encoder_q.fc.3.running_mean" in sd and "encoder_q.fc.3.weight" not in sd  # no affine
    out = model.encoder_q(torch.randn(8, 3, 16, 16) + torch.linspace(0, 3, 8)[:, None, None, None])
    for j in range(2):
        half = out[j::2]
        assert torch.allclose(half.mean(0), torch.zeros(16), atol=1e-5)
        assert torch.allclose(half.var(0, unbiased=False), torch.ones(16), atol=0.02)  # eps 1e-5 in the denominator
    v1 = MoCo(LinearEncoder, dim=4, K=8, mlp=False, head_norm=HeadBatchNorm)
    sd = v1.state_dict()
    assert sd["encoder_q.fc.0.weight"].shape == (4, 6) and "encoder_k.fc.1.running_var" in sd
    logits, _ = v1(torch.randn(4, 6), torch.randn(4, 6))
    assert logits.shape == (4, 9) and torch.isfinite(logits).all()


def test_add_mlp_head_uses_encoder_width():
    enc = add_mlp_head(build_resnet("resnet18", num_classes=128))
    assert enc.fc[0].weight.shape == (512, 512) and enc.fc[2].weight.shape == (128, 512)


def test_small_image_stem():
    model = build_resnet("resnet18", num_classes=10, small_images=True)
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert isinstance(model.maxpool, nn.Identity)
    assert model(torch.randn(2, 3, 16, 16)).shape == (2, 10)
    with pytest.raises(ValueError, match="--arch 'vgg16'"):
        build_resnet("vgg16")


def _perturb_query_encoder(model: MoCo, scale: float = 0.5) -> None:
    """Move the query encoder away from the key encoder: on a fresh model they are equal, so a momentum step
    run twice, or never, would leave the key encoder where one step leaves it."""
    with torch.no_grad():
        for param in model.encoder_q.parameters():
            param.add_(scale * torch.randn_like(param))


def _linear_keys(weight: torch.Tensor, bias: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A LinearEncoder's normalised output, written out: the reference key forward."""
    return F.normalize(x.flatten(1) @ weight.T + bias, dim=1)


def test_symmetric_loss_stacks_both_directions_and_enqueues_both_key_batches():
    """Rows 0..N-1: view 1 as query against view 2's key; rows N..2N-1 the other way; both key sets queued.

    The key encoder ends one momentum step from where it started, m k + (1 - m) q, and both key batches are
    encoded with that stepped encoder (one update, before either key forward).
    """
    model = tiny_moco(K=8, m=0.5, symmetric=True)
    _perturb_query_encoder(model)
    w_q, b_q = model.encoder_q.fc.weight.detach().clone(), model.encoder_q.fc.bias.detach().clone()
    w_k, b_k = model.encoder_k.fc.weight.detach().clone(), model.encoder_k.fc.bias.detach().clone()
    assert not torch.allclose(w_q, w_k)
    w_ref, b_ref = 0.5 * w_k + 0.5 * w_q, 0.5 * b_k + 0.5 * b_q
    im1, im2 = torch.randn(2, 6), torch.randn(2, 6)
    queue = model.queue.clone()
    logits, labels = model(im1, im2)
    assert torch.allclose(model.encoder_k.fc.weight, w_ref, atol=1e-6)
    assert torch.allclose(model.encoder_k.fc.bias, b_ref, atol=1e-6)
    k1, k2 = _linear_keys(w_ref, b_ref, im1), _linear_keys(w_ref, b_ref, im2)
    q1, q2 = _linear_keys(w_q, b_q, im1), _linear_keys(w_q, b_q, im2)
    expected = torch.cat([
        torch.cat([(q1 * k2).sum(1, keepdim=True), q1 @ queue], dim=1),
        torch.cat([(q2 * k1).sum(1, keepdim=True), q2 @ queue], dim=1),
    ]) / model.T
    assert logits.shape == (4, 9) and torch.equal(labels, torch.zeros(4, dtype=torch.long))
    assert torch.allclose(logits, expected, atol=1e-5)
    assert int(model.queue_ptr) == 4
    assert torch.allclose(model.queue[:, :4], torch.cat([k2, k1]).T, atol=1e-6)
    loss = F.cross_entropy(logits, labels)
    halves = (F.cross_entropy(logits[:2], labels[:2]) + F.cross_entropy(logits[2:], labels[2:])) / 2
    assert torch.allclose(loss, halves)


@pytest.mark.parametrize("symmetric", [False, True], ids=["plain", "symmetric"])
def test_training_steps_follow_a_step_by_step_reference(symmetric: bool):
    """Several SGD steps against a reference kept here: before each step's key forward the key encoder takes
    exactly one momentum step towards the query encoder as it is then; the logits use those keys and the
    queue as it was; the keys enter the queue. An update run twice, never, or after the keys fails this."""
    m, lr, steps, batch = 0.9, 0.5, 4, 2
    model = tiny_moco(K=16, m=m, T=0.5, symmetric=symmetric)
    _perturb_query_encoder(model)
    optimizer = torch.optim.SGD(model.encoder_q.parameters(), lr=lr)
    w_k, b_k = model.encoder_k.fc.weight.detach().clone(), model.encoder_k.fc.bias.detach().clone()
    queue = model.queue.clone()
    ptr = 0
    gen = torch.Generator().manual_seed(1)
    for step in range(steps):
        im_q, im_k = torch.randn(batch, 6, generator=gen), torch.randn(batch, 6, generator=gen)
        w_q, b_q = model.encoder_q.fc.weight.detach().clone(), model.encoder_q.fc.bias.detach().clone()
        w_k, b_k = m * w_k + (1 - m) * w_q, m * b_k + (1 - m) * b_q
        pairs = [(im_q, im_k), (im_k, im_q)] if symmetric else [(im_q, im_k)]
        expected, new_keys = [], []
        for x_q, x_k in pairs:
            q, k = _linear_keys(w_q, b_q, x_q), _linear_keys(w_k, b_k, x_k)
            expected.append(torch.cat([(q * k).sum(1, keepdim=True), q @ queue], dim=1) / 0.5)
            new_keys.append(k)
        logits, labels = model(im_q, im_k)
        assert torch.allclose(model.encoder_k.fc.weight, w_k, atol=1e-6), step
        assert torch.allclose(model.encoder_k.fc.bias, b_k, atol=1e-6), step
        assert torch.allclose(logits, torch.cat(expected), atol=1e-5), step
        keys = torch.cat(new_keys)
        queue[:, ptr:ptr + len(keys)] = keys.T
        ptr = (ptr + len(keys)) % 16
        assert int(model.queue_ptr) == ptr and torch.allclose(model.queue, queue, atol=1e-6), step
        optimizer.zero_grad()
        F.cross_entropy(logits, labels).backward()
        optimizer.step()
        assert not torch.allclose(model.encoder_q.fc.weight, w_q)  # the query encoder moves every step


def test_queue_pointer_follows_a_loaded_state_dict():
    """The pointer is kept on the host (no GPU sync per step) and re-read after load_state_dict."""
    model = tiny_moco()
    model.dequeue_and_enqueue(F.normalize(torch.randn(4, 4), dim=1))
    state = tiny_moco().state_dict()  # pointer 0
    model.load_state_dict(state)
    keys = F.normalize(torch.randn(4, 4), dim=1)
    model.dequeue_and_enqueue(keys)
    assert int(model.queue_ptr) == 4 and torch.equal(model.queue[:, :4], keys.T)
