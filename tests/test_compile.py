"""`--compile`: the encoders are compiled in place, so the checkpoint layout and the loss stay as they are.

Inductor needs minutes on this CPU box, so the test compiles with the eager backend: the same graph capture,
graph breaks and guards, without code generation. The speed is measured on a GPU by benchmarks/gpu_check.sh.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from moco_transfer.pretrain.config import resolve_config
from moco_transfer.pretrain.engine import build_model, compile_encoders


def test_compiled_encoders_keep_the_keys_and_give_the_same_loss_and_gradients(tmp_path):
    cfg = resolve_config("scattered-digits", overrides={"output": str(tmp_path), "compile": True})
    assert cfg.compile
    torch.manual_seed(0)
    eager = build_model(cfg)
    compiled = copy.deepcopy(eager)
    compile_encoders(compiled, backend="eager")
    assert list(compiled.state_dict()) == list(eager.state_dict())
    im_q, im_k = torch.randn(2, 64, 3, 16, 16).unbind(0)
    losses = []
    for model in (eager, compiled):
        torch.manual_seed(1)  # the key shuffle draws from the global generator
        loss = F.cross_entropy(*model(im_q, im_k))
        loss.backward()
        losses.append(loss)
    assert torch.allclose(losses[0], losses[1], rtol=1e-6, atol=1e-6)
    for (name, p), q in zip(eager.named_parameters(), compiled.parameters(), strict=True):
        if p.grad is not None:
            assert torch.allclose(p.grad, q.grad, rtol=1e-5, atol=1e-6), name
    assert torch.equal(eager.queue, compiled.queue) and int(eager.queue_ptr) == int(compiled.queue_ptr) == 64
    assert compiled.encoder_q._compiled_call_impl is not None and eager.encoder_q._compiled_call_impl is None
