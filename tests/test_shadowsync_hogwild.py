"""Hogwild: several threads train one shared replica lock-free (no Horovod needed)."""

import pytest
import torch

from shadowsync import Hogwild


def regression(n: int = 2048):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, 8, generator=gen)
    return x, x @ torch.arange(1.0, 9.0).unsqueeze(1)


def test_threads_share_one_replica_and_count_steps():
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 1)
    x, y = regression()
    batches = [(x[i : i + 32], y[i : i + 32]) for i in range(0, len(x), 32)]
    ticks = []

    def loss_fn(batch):
        return torch.nn.functional.mse_loss(model(batch[0]), batch[1])

    before = loss_fn((x, y)).item()
    stats = Hogwild(model, lr=0.02, on_step=ticks.append).run(
        loss_fn, [batches[0::3], batches[1::3], batches[2::3]], batch_size=lambda b: len(b[0])
    )
    assert stats.iterations == len(batches) == len(ticks)
    assert stats.examples == len(x)
    assert loss_fn((x, y)).item() < 0.01 * before


def test_sparse_embedding_gradients_apply():
    emb = torch.nn.Embedding(10, 2, sparse=True)
    before = emb.weight.detach().clone()
    Hogwild(emb, lr=0.5).step(emb(torch.tensor([3])).sum())
    changed = (emb.weight.detach() != before).any(1)
    assert changed.tolist() == [i == 3 for i in range(10)]
    # d(sum of row 3)/d(row 3) = 1 per element: one SGD step of lr 0.5 lowers it by 0.5
    torch.testing.assert_close(emb.weight.detach()[3], before[3] - 0.5)


def test_worker_error_surfaces_after_all_stop():
    model = torch.nn.Linear(2, 1)

    def loss_fn(batch):
        if batch == "bad":
            raise ValueError("bad batch")
        return model(torch.ones(1, 2)).sum()

    with pytest.raises(RuntimeError, match="Hogwild worker failed") as info:
        Hogwild(model, lr=0.1).run(loss_fn, [["ok", "bad"], ["ok"] * 3])
    assert isinstance(info.value.__cause__, ValueError)
    with pytest.raises(ValueError, match="lr"):
        Hogwild(model, lr=0.0)
