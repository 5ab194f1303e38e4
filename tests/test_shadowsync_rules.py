"""The ShadowSync update rules and flat-vector helpers against hand-computed values."""

import pytest
import torch

from shadowsync.flat import add_flat_, copy_flat_, flatten
from shadowsync.rules import (
    BlockMomentum,
    ElasticAveraging,
    ModelAveraging,
    bmuf_update,
    easgd_center,
    easgd_elastic,
    ma_delta,
    make_rule,
)
from shadowsync.stats import SyncStats


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def test_ma_delta_moves_to_the_mean():
    # replicas [1, 2] and [3, 4]: mean [2, 3]
    assert torch.equal(ma_delta(t(1, 2), total=t(4, 6), n=2), t(1, 1))


def test_easgd_elastic_and_center():
    d = easgd_elastic(t(1, 3), center=t(0, 1), alpha=0.5)
    assert torch.equal(d, t(0.5, 1.0))
    # the other trainer contributed d = [-0.5, 0.5]
    assert torch.equal(easgd_center(t(0, 1), t(0.0, 1.5)), t(0.0, 2.5))


def test_bmuf_two_blocks_by_hand():
    g, m, target = bmuf_update(
        t(1), t(0), mean_w=t(3), block_momentum=0.875, block_lr=1.0, nesterov=False
    )
    # G = 2, Delta = 2, w_g = 3
    assert (g.item(), m.item(), target.item()) == (3.0, 2.0, 3.0)
    g, m, target = bmuf_update(g, m, mean_w=t(4), block_momentum=0.875, block_lr=1.0, nesterov=True)
    # G = 1, Delta = 0.875 * 2 + 1 = 2.75, w_g = 5.75, look-ahead 5.75 + 0.875 * 2.75
    assert (g.item(), m.item()) == (5.75, 2.75)
    assert target.item() == pytest.approx(8.15625)


def test_block_lr_scales_the_block_gradient():
    g, m, _ = bmuf_update(t(0), t(0), mean_w=t(2), block_momentum=0.5, block_lr=0.5, nesterov=False)
    assert (g.item(), m.item()) == (1.0, 1.0)


def test_ma_rule_keeps_progress_made_while_in_flight():
    rule = ModelAveraging()
    rule.start(t(1, 2), n=2)
    snapshot = t(1, 2)
    sent = rule.outgoing(snapshot)
    live = snapshot + t(0.25, 0.25)  # workers kept training during the allreduce
    live += rule.incoming(snapshot, total=sent + t(3, 4), n=2)
    assert torch.equal(live, t(2.25, 3.25))


def test_easgd_rule_updates_replica_and_center():
    rule = ElasticAveraging(alpha=0.5)
    rule.start(t(0, 1), n=2)
    w = t(1, 3)
    out = rule.outgoing(w)
    assert torch.equal(out, t(0.5, 1.0))
    delta = rule.incoming(w, total=out + t(-0.5, 0.5), n=2)
    assert torch.equal(w + delta, t(0.5, 2.0))
    assert torch.equal(rule.center, t(0.0, 2.5))


def test_rule_defaults_depend_on_trainer_count():
    easgd = ElasticAveraging()
    easgd.start(t(0), n=3)
    assert easgd.alpha == pytest.approx(0.3)
    bmuf = BlockMomentum()
    bmuf.start(t(0), n=8)
    assert bmuf.block_momentum == pytest.approx(0.875)  # fairseq's default at n = 8


def test_bmuf_rule_returns_target_minus_snapshot():
    rule = BlockMomentum(block_momentum=0.875)
    rule.start(t(1), n=2)
    delta = rule.incoming(t(1.5), total=t(6), n=2)  # mean 3 -> w_g 3
    assert delta.item() == 1.5


def test_bmuf_last_round_is_a_block_update_without_momentum():
    rule = BlockMomentum(block_momentum=0.5)
    rule.start(t(0), n=2)
    assert rule.incoming(t(0), total=t(4), n=2).item() == 2.0  # mean 2: Delta 2, w_g 2
    # mean 3: with momentum Delta would be 0.5 * 2 + 1 = 2 (w_g 4); the last round
    # stops at the mean, where the workers actually are.
    assert rule.incoming(t(2), total=t(6), n=2, last=True).item() == 1.0
    assert rule.global_w.item() == 3.0


def test_bmuf_warmup_rounds_average_without_momentum():
    rule = BlockMomentum(block_momentum=0.5, warmup_rounds=1)
    rule.start(t(0), n=2)
    assert rule.incoming(t(0), total=t(4), n=2).item() == 2.0  # warm-up: to the mean 2
    assert rule.momentum.item() == 0.0  # the warm-up leaves no momentum behind
    # mean 3: G = 1, Delta = 0.5 * 0 + 1 = 1, w_g 3 (2 momentum-free without the reset)
    assert rule.incoming(t(2), total=t(6), n=2).item() == 1.0
    # mean 3.5: G = 0.5, Delta = 0.5 * 1 + 0.5 = 1, w_g 4
    assert rule.incoming(t(3), total=t(7), n=2).item() == 1.0
    assert rule.global_w.item() == 4.0
    assert BlockMomentum().warmup_rounds == 2


def test_make_rule_validates():
    assert make_rule("ma").name == "ma"
    assert make_rule("easgd", alpha=0.2).alpha == 0.2
    assert make_rule("bmuf", nesterov=True).nesterov
    with pytest.raises(ValueError, match="unknown algorithm"):
        make_rule("sgd")
    with pytest.raises(ValueError, match="alpha"):
        make_rule("easgd", alpha=1.5)
    with pytest.raises(ValueError, match="block_momentum"):
        make_rule("bmuf", block_momentum=1.0)
    with pytest.raises(ValueError, match="warmup_rounds"):
        make_rule("bmuf", warmup_rounds=-1)
    with pytest.raises(TypeError):
        make_rule("ma", alpha=0.1)
    with pytest.raises(RuntimeError, match="start"):
        ElasticAveraging(alpha=0.5).outgoing(t(1))


def test_easgd_rejects_an_alpha_that_diverges():
    # Idle rounds map (mean replica, centre) by eigenvalues 1 and 1 - (n + 1) alpha.
    ElasticAveraging(alpha=0.66).start(t(0), n=2)
    with pytest.raises(ValueError, match="diverges"):
        ElasticAveraging(alpha=0.7).start(t(0), n=2)
    with pytest.raises(ValueError, match="diverges"):
        ElasticAveraging(alpha=0.5).start(t(0), n=3)


def test_flat_roundtrip_and_in_place_add():
    a = torch.nn.Parameter(torch.ones(2, 2))
    b = torch.nn.Parameter(torch.zeros(3))
    flat = flatten([a, b])
    assert flat.tolist() == [1, 1, 1, 1, 0, 0, 0]
    add_flat_([a, b], torch.arange(7, dtype=torch.float32))
    assert a.tolist() == [[1, 2], [3, 4]] and b.tolist() == [4, 5, 6]
    copy_flat_([a, b], torch.zeros(7))
    assert flatten([a, b]).abs().sum() == 0
    with pytest.raises(ValueError, match="parameters need"):
        add_flat_([a, b], torch.zeros(6))


def test_sync_gap_is_iterations_per_round():
    assert SyncStats("ma").sync_gap is None
    stats = SyncStats("ma", rounds=4, worker_iterations=10)
    assert stats.sync_gap == 2.5 and stats.as_dict()["sync_gap"] == 2.5
