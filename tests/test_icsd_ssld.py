"""ICSD, pixel KD, adaptive loss weighting, SSLD and Hinton KD against hand computations."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from methods.icsd import (alw_weights, ics_matrix, ics_matrix_released, icsd_loss, intra_class_distributions,
                          pixel_kd_loss)
from methods.ssld import hinton_kd_loss, kl, mine_confident, ssld_loss


def _kl(p, q):
    return sum(a * math.log(a / b) for a, b in zip(p, q))


def test_intra_class_distribution_is_a_softmax_over_positions():
    z = torch.tensor([[[[0.0, math.log(3.0)]], [[0.0, 0.0]]]])       # B=1, C=2, H=1, W=2
    p = intra_class_distributions(z)
    assert p[0, 0].tolist() == pytest.approx([0.25, 0.75])
    assert p[0, 1].tolist() == pytest.approx([0.5, 0.5])


def test_ics_matrix_by_hand():
    z = torch.tensor([[[[0.0, math.log(3.0)]], [[0.0, 0.0]], [[math.log(2.0), 0.0]]]])
    dists = [[0.25, 0.75], [0.5, 0.5], [2 / 3, 1 / 3]]
    raw = [[_kl(a, b) for b in dists] for a in dists]
    expected = [[v / math.sqrt(sum(x * x for x in row)) for v in row] for row in raw]
    got = ics_matrix(z)[0]
    for i in range(3):
        assert got[i].tolist() == pytest.approx(expected[i], abs=1e-6)


@pytest.mark.parametrize("classes", [19, 21])
def test_icsd_loss_matches_element_loops(classes):
    g = torch.Generator().manual_seed(classes)
    zs, zt = torch.randn(2, classes, 3, 4, generator=g), torch.randn(2, classes, 3, 4, generator=g)
    loss = icsd_loss(zs, zt)
    total = 0.0
    for b in range(2):
        mats = []
        for z in (zs, zt):
            p = F.softmax(z[b].reshape(classes, -1), dim=1).tolist()
            m = [[_kl(p[i], p[j]) for j in range(classes)] for i in range(classes)]
            mats.append([[v / math.sqrt(sum(x * x for x in row)) for v in row] for row in m])
        total += sum((mats[0][i][j] - mats[1][i][j]) ** 2 for i in range(classes) for j in range(classes))
    assert loss.item() == pytest.approx(total / (2 * classes * classes), rel=1e-4)
    assert ics_matrix(zs).shape == (2, classes, classes)


def test_released_variant_matches_the_released_code():
    """The released code, literally: softmax over H, KLDivLoss('batchmean') on probabilities."""
    g = torch.Generator().manual_seed(3)
    b, c = 2, 4
    zs, zt = torch.randn(b, c, 5, 3, generator=g), torch.randn(b, c, 5, 3, generator=g)
    crit = torch.nn.KLDivLoss(reduction="batchmean")

    def released(z):
        p = F.softmax(z, dim=2)
        m = torch.zeros(c, c)
        for i in range(c):
            for j in range(i, c):
                m[i, j] = m[j, i] = crit(p[:, i], p[:, j])
        return F.normalize(m, p=2, dim=1)
    assert torch.allclose(ics_matrix_released(zs), released(zs), atol=1e-5)
    expected = ((released(zs) - released(zt)) ** 2).mean() / b
    assert icsd_loss(zs, zt, "released").item() == pytest.approx(expected.item(), rel=1e-4)
    with pytest.raises(ValueError, match="paper, released"):
        icsd_loss(zs, zt, "other")


def test_pixel_kd_by_hand_and_ignore():
    zt = torch.tensor([[[[math.log(3.0), 0.0]], [[0.0, 0.0]]]])        # pixel 0: p_t = (3/4, 1/4)
    zs = torch.zeros(1, 2, 1, 2)                                        # p_s = (1/2, 1/2)
    k0 = _kl([0.75, 0.25], [0.5, 0.5])
    assert pixel_kd_loss(zs, zt, variant="paper").item() == pytest.approx(k0 / 2)   # pixel 1: KL 0
    ignore = torch.tensor([[[False, True]]])
    assert pixel_kd_loss(zs, zt, ignore=ignore, variant="paper").item() == pytest.approx(k0)
    # released: the KL's terms averaged over B*C*H*W = 4, void pixels included
    assert pixel_kd_loss(zs, zt).item() == pytest.approx(k0 / 4)
    assert pixel_kd_loss(zs, zt, ignore=ignore).item() == pytest.approx(k0 / 4)


def test_alw_weights_first_middle_last_epoch():
    assert alw_weights(0, 120) == (0.0, 1.0)               # all pixel KD at the start
    assert alw_weights(60, 120) == (0.5, 0.5)
    assert alw_weights(119, 120) == pytest.approx((119 / 120, 1 / 120))


def test_ssld_symmetric_kl_by_hand():
    zs = torch.tensor([[0.0, 0.0]])
    zt = torch.tensor([[math.log(3.0), 0.0]])
    expected = 0.5 * (_kl([0.75, 0.25], [0.5, 0.5]) + _kl([0.5, 0.5], [0.75, 0.25]))
    assert ssld_loss(zs, zt).item() == pytest.approx(expected)
    assert ssld_loss(zt, zs).item() == pytest.approx(expected)        # symmetric
    assert ssld_loss(zt, zt).item() == pytest.approx(0.0, abs=1e-7)


def test_hinton_kd_by_hand():
    zs, zt = torch.tensor([[0.0, 0.0]]), torch.tensor([[4 * math.log(3.0), 0.0]])   # at T=4: (3/4, 1/4)
    out = hinton_kd_loss(zs, zt, torch.tensor([0]), temp=4.0, weight=0.5)
    assert out["ce"].item() == pytest.approx(math.log(2.0))
    assert out["kd"].item() == pytest.approx(0.5 * 16 * _kl([0.75, 0.25], [0.5, 0.5]))
    assert kl(zt, zs, 4.0).item() == pytest.approx(_kl([0.75, 0.25], [0.5, 0.5]))


def test_mining_picks_the_planted_confident_images():
    g = torch.Generator().manual_seed(0)
    probs = F.softmax(torch.randn(40, 4, generator=g) * 0.1, dim=1)     # unsure teacher
    planted = {3: 0, 17: 0, 25: 2, 31: 2}
    for i, c in planted.items():
        row = torch.full((4,), 0.01)
        row[c] = 0.97
        probs[i] = row
    picked = mine_confident(probs, k=2)
    for c in (0, 2):
        of_class = [i for i in picked.tolist() if probs[i].argmax() == c]
        assert sorted(of_class) == sorted(i for i, pc in planted.items() if pc == c)
    assert len(picked) <= 2 * 4
