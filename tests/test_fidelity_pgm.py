"""GKP's prototype generation (PGM) against the released code: the density filter and
the joint matching pursuit pick the same prototypes as a transcription of the released
function, on clustered descriptors where the two differed before (a quantile with
``>=`` instead of ``sorted[int(0.4 n)]`` with ``>``; residuals over the candidates only
and no candidate picked twice)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from methods.gkp import density_filter, joint_matching_pursuit


def released_generate_prototypes_single(ma_cls_feats: np.ndarray, mb_cls_feats: np.ndarray,
                                        max_num_prototypes: int = 10, alpha: float = 10) -> np.ndarray:
    """Transcription of hikvision-research/DAVAR-Lab-ML,
    ECCV22_Distilling_Object_Detectors_with_Global_Knowledge/ObjectPerceptron/mmdetection/
    third_party/kd/mmdet/strategy/prototype_generation_module.py,
    ``PrototypeGenerationModule._generate_prototypes_single`` (with ``_norm_feats``),
    returning ``prototype_indexes``. The released code normalises into half precision on
    CUDA (``.half().cuda()``); here the same arithmetic runs in float64 on the CPU."""
    def norm_feats(feats):
        norm_feat_factor = np.sqrt(np.power(feats, 2).sum(1))
        norm_feat_factor = norm_feat_factor.reshape(-1, 1)
        return torch.from_numpy(feats / norm_feat_factor).double()

    ma_cls_feats_normed = norm_feats(ma_cls_feats)
    mb_cls_feats_normed = norm_feats(mb_cls_feats)
    dist_mat_a = 1 - torch.mm(ma_cls_feats_normed, ma_cls_feats_normed.T)
    dist_mat_b = 1 - torch.mm(mb_cls_feats_normed, mb_cls_feats_normed.T)
    density_a = torch.exp(-1 * torch.pow(dist_mat_a / 0.1, 2)).sum(axis=1)
    density_b = torch.exp(-1 * torch.pow(dist_mat_b / 0.1, 2)).sum(axis=1)
    middle = int(len(density_a) * 0.4)
    density_a_lb = density_a.sort().values[middle]
    density_b_lb = density_b.sort().values[middle]
    proposal_gamma = torch.where((density_a > density_a_lb) & (density_b > density_b_lb))[0]
    ma_cls_feats_normed = ma_cls_feats_normed.T
    mb_cls_feats_normed = mb_cls_feats_normed.T
    proposal_feats_a = ma_cls_feats_normed[:, proposal_gamma]
    proposal_feats_b = mb_cls_feats_normed[:, proposal_gamma]
    K = proposal_feats_a.shape[1]
    N = ma_cls_feats_normed.shape[1]
    Da = ma_cls_feats_normed.shape[0]
    Db = mb_cls_feats_normed.shape[0]
    prototype_indexes = []
    cnt = 0
    residual_a = ma_cls_feats_normed.clone()
    residual_b = mb_cls_feats_normed.clone()
    while cnt < max_num_prototypes:
        inner_a = torch.mm(proposal_feats_a.T, residual_a)
        inner_b = torch.mm(proposal_feats_b.T, residual_b)
        w_a = (alpha * (inner_a + inner_b) + inner_a) / (1 + 2 * alpha)
        w_b = (alpha * (inner_a + inner_b) + inner_b) / (1 + 2 * alpha)
        res_a = proposal_feats_a.T.view(K, Da, 1) * w_a.view(K, 1, N)
        res_b = proposal_feats_b.T.view(K, Db, 1) * w_b.view(K, 1, N)
        err_a = res_a - residual_a.view(1, Da, N)
        err_b = res_b - residual_b.view(1, Db, N)
        err_w = w_a - w_b
        err_sum = (err_a ** 2).sum(-1).sum(-1) + (err_b ** 2).sum(-1).sum(-1) + alpha * (err_w ** 2).sum(-1)
        gamma = torch.argmin(err_sum.float())
        prototype_indexes.append(proposal_gamma[gamma])
        residual_a = residual_a - torch.mm(proposal_feats_a[:, gamma].view(-1, 1), w_a[gamma, :].view(1, -1))
        residual_b = residual_b - torch.mm(proposal_feats_b[:, gamma].view(-1, 1), w_b[gamma, :].view(1, -1))
        cnt += 1
    return torch.tensor(prototype_indexes).cpu().numpy()


def _clustered(seed: int, n: int, clusters: int, da: int = 32, db: int = 24, noise: float = 0.25):
    """Descriptors of n instances in a few tight clusters plus outliers, each instance's
    cluster shared by the two spaces (as a teacher's and a student's views of it)."""
    rng = np.random.default_rng(seed)
    centres_a, centres_b = rng.normal(size=(clusters, da)), rng.normal(size=(clusters, db))
    owner = rng.integers(0, clusters, n)
    a = centres_a[owner] + noise * rng.normal(size=(n, da))
    b = centres_b[owner] + noise * rng.normal(size=(n, db))
    outliers = rng.choice(n, n // 10, replace=False)
    a[outliers] = 3 * rng.normal(size=(len(outliers), da))
    return np.abs(a) + 0.01, np.abs(b) + 0.01        # (post-ReLU features are non-negative)


def _ours(fa: np.ndarray, fb: np.ndarray, m: int = 10) -> np.ndarray:
    a = F.normalize(torch.from_numpy(fa).double(), dim=1)
    b = F.normalize(torch.from_numpy(fb).double(), dim=1)
    keep = density_filter(a, b, 40.0)
    return joint_matching_pursuit(a, b, m=m, alpha=10.0, candidates=keep).numpy()


@pytest.mark.parametrize("seed,n,clusters", [(0, 60, 3), (1, 200, 5), (2, 37, 2), (3, 800, 8)])
def test_pgm_picks_the_released_prototypes(seed, n, clusters):
    fa, fb = _clustered(seed, n, clusters)
    want = released_generate_prototypes_single(fa, fb, max_num_prototypes=10, alpha=10)
    got = _ours(fa, fb)
    assert got.tolist() == want.tolist()


def test_the_density_filter_is_the_released_one_strictly_above_sorted_int_0_4_n():
    fa, fb = _clustered(4, 50, 3)
    a = F.normalize(torch.from_numpy(fa).double(), dim=1)
    b = F.normalize(torch.from_numpy(fb).double(), dim=1)
    keep = density_filter(a, b, 40.0)
    from methods.gkp import density
    da, db = density(a), density(b)
    middle = int(50 * 0.4)
    assert torch.equal(keep, (da > da.sort().values[middle]) & (db > db.sort().values[middle]))


def test_a_candidate_may_be_picked_again_as_released():
    """On one tight cluster the released pursuit explains the residual with the same
    candidate more than once; the old pursuit (each candidate once) could not."""
    fa, fb = _clustered(5, 40, 1, noise=0.05)
    want = released_generate_prototypes_single(fa, fb, max_num_prototypes=10, alpha=10)
    got = _ours(fa, fb)
    assert got.tolist() == want.tolist() and len(set(got.tolist())) < len(got)
