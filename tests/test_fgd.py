"""FGD terms against values computed by hand (or by explicit element loops) on small tensors."""
import math

import pytest
import torch

from methods._base import ModelInfo
from methods.fgd import FGD, GcBlock, attention, focal_losses, focal_masks, global_loss


def _masks(boxes, img_hw=(8.0, 8.0), size=(4, 4)):
    b = torch.tensor([boxes], dtype=torch.float32).reshape(1, -1, 4)
    valid = torch.ones(1, b.shape[1], dtype=torch.bool)
    fg, bg = focal_masks(b, valid, torch.tensor([img_hw]), *size)
    return fg[0], bg[0]


def test_mask_single_box():
    # 8x8 image on a 4x4 grid: x scaled by 0.5, box (0,0,4,4) -> cells 0..2 (ceil(2) = 2), 3x3 cells
    fg, bg = _masks([[0, 0, 4, 4]])
    expected = torch.zeros(4, 4)
    expected[:3, :3] = 1 / 9
    assert torch.allclose(fg, expected)
    expected_bg = torch.zeros(4, 4)
    expected_bg[fg == 0] = 1 / 7          # 7 uncovered cells, normalised to sum 1
    assert torch.allclose(bg, expected_bg)


def test_mask_fractional_box_rounds_outwards():
    # box (1,1,3,5): x 0.5..1.5 -> floor 0, ceil 2; y 0.5..2.5 -> 0..3: 4 rows x 3 cols
    fg, _ = _masks([[1, 1, 3, 5]])
    expected = torch.zeros(4, 4)
    expected[0:4, 0:3] = 1 / 12
    assert torch.allclose(fg, expected)


def test_mask_box_on_image_border_is_clipped_but_keeps_its_weight():
    # box (4,4,8,8) -> cells 2..4, but the grid ends at 3: covers 2x2 cells, weight 1/(3*3)
    fg, _ = _masks([[4, 4, 8, 8]])
    expected = torch.zeros(4, 4)
    expected[2:, 2:] = 1 / 9
    assert torch.allclose(fg, expected)


def test_mask_overlap_smallest_box_wins():
    fg, bg = _masks([[0, 0, 8, 8], [0, 0, 2, 2]])   # whole image (1/25) and a 2x2-cell box (1/4)
    expected = torch.full((4, 4), 1 / 25)
    expected[:2, :2] = 1 / 4
    assert torch.allclose(fg, expected)
    assert torch.count_nonzero(bg) == 0           # all foreground: background stays 0, no NaN


def test_mask_order_of_boxes_does_not_matter():
    a, _ = _masks([[0, 0, 8, 8], [2, 2, 6, 6]])
    b, _ = _masks([[2, 2, 6, 6], [0, 0, 8, 8]])
    assert torch.equal(a, b)


def test_mask_image_without_boxes_and_padding_rows():
    boxes = torch.tensor([[[0, 0, 4, 4]], [[0, 0, 0, 0]]], dtype=torch.float32)
    valid = torch.tensor([[True], [False]])        # image 2 has no box: its only slot is padding
    fg, bg = focal_masks(boxes, valid, torch.tensor([[8.0, 8.0], [8.0, 8.0]]), 4, 4)
    assert torch.count_nonzero(fg[1]) == 0
    assert torch.allclose(bg[1], torch.full((4, 4), 1 / 16))
    assert torch.allclose(bg.sum(dim=(1, 2)), torch.ones(2))


def test_mask_uses_each_images_own_shape():
    # the same box in a 16x16 image covers half as many cells
    boxes = torch.tensor([[[0, 0, 4, 4]], [[0, 0, 4, 4]]], dtype=torch.float32)
    fg, _ = focal_masks(boxes, torch.ones(2, 1, dtype=torch.bool), torch.tensor([[8.0, 8.0], [16.0, 16.0]]), 4, 4)
    assert torch.isclose(fg[0, 0, 0], torch.tensor(1 / 9))
    assert torch.isclose(fg[1, 0, 0], torch.tensor(1 / 4))   # cells 0..1 x 0..1


def test_attention_by_hand():
    # one channel, a 1x2 map |F| = [1, 3], T = 1: spatial = 2 * softmax([1, 3])
    f = torch.tensor([[[[1.0, -3.0]]]])
    spatial, channel = attention(f, 1.0)
    e1, e3 = math.exp(1), math.exp(3)
    assert torch.allclose(spatial, torch.tensor([[[2 * e1 / (e1 + e3), 2 * e3 / (e1 + e3)]]]))
    assert torch.allclose(channel, torch.tensor([[1.0]]))


def test_channel_attention_by_hand():
    # two channels with mean |F| 1 and 2, T = 0.5: channel = 2 * softmax([2, 4])
    f = torch.tensor([[[[1.0, -1.0]], [[2.0, 2.0]]]])
    _, channel = attention(f, 0.5)
    e2, e4 = math.exp(2), math.exp(4)
    assert torch.allclose(channel, torch.tensor([[2 * e2 / (e2 + e4), 2 * e4 / (e2 + e4)]]))


def test_focal_losses_by_hand():
    ft = torch.tensor([[[[1.0, 3.0]]]])
    fs = torch.zeros(1, 1, 1, 2)
    fg = torch.tensor([[[1.0, 0.0]]])
    bg = torch.tensor([[[0.0, 1.0]]])
    out = focal_losses(fs, ft, fg, bg, temp=1.0)
    e1, e3 = math.exp(1), math.exp(3)
    a0, a1 = 2 * e1 / (e1 + e3), 2 * e3 / (e1 + e3)        # teacher spatial attention
    assert out["fg"].item() == pytest.approx(a0 * 1.0)      # (0 - 1)^2 weighted by A_S^t
    assert out["bg"].item() == pytest.approx(a1 * 9.0)      # (0 - 3)^2
    # student map is all zeros: uniform spatial attention [1, 1], channel attention 1
    assert out["att"].item() == pytest.approx(abs(1 - a0) + abs(1 - a1))


def test_focal_losses_match_element_loops():
    g = torch.Generator().manual_seed(0)
    n, c, h, w, temp = 2, 3, 4, 5, 0.5
    fs, ft = torch.randn(n, c, h, w, generator=g), torch.randn(n, c, h, w, generator=g)
    fg, bg = torch.rand(n, h, w, generator=g), torch.rand(n, h, w, generator=g)
    out = focal_losses(fs, ft, fg, bg, temp)
    exp_fg = exp_bg = exp_att = 0.0
    for i in range(n):
        sp_t = [[sum(abs(ft[i, k, y, x].item()) for k in range(c)) / c for x in range(w)] for y in range(h)]
        sp_s = [[sum(abs(fs[i, k, y, x].item()) for k in range(c)) / c for x in range(w)] for y in range(h)]
        ch_t = [sum(abs(ft[i, k, y, x].item()) for y in range(h) for x in range(w)) / (h * w) for k in range(c)]
        ch_s = [sum(abs(fs[i, k, y, x].item()) for y in range(h) for x in range(w)) / (h * w) for k in range(c)]

        def soft(vals, scale):
            ex = [math.exp(v / temp) for v in vals]
            return [scale * e / sum(ex) for e in ex]
        at_t = soft([v for row in sp_t for v in row], h * w)
        at_s = soft([v for row in sp_s for v in row], h * w)
        ac_t, ac_s = soft(ch_t, c), soft(ch_s, c)
        for k in range(c):
            for y in range(h):
                for x in range(w):
                    d = (fs[i, k, y, x] - ft[i, k, y, x]).item() ** 2 * at_t[y * w + x] * ac_t[k]
                    exp_fg += d * fg[i, y, x].item()
                    exp_bg += d * bg[i, y, x].item()
        exp_att += sum(abs(a - b) for a, b in zip(ac_s, ac_t)) + sum(abs(a - b) for a, b in zip(at_s, at_t))
    assert out["fg"].item() == pytest.approx(exp_fg / n, rel=1e-5)
    assert out["bg"].item() == pytest.approx(exp_bg / n, rel=1e-5)
    assert out["att"].item() == pytest.approx(exp_att / n, rel=1e-5)


def test_gcblock_starts_as_identity_and_global_loss_is_then_plain_sse():
    torch.manual_seed(0)
    gs, gt = GcBlock(4), GcBlock(4)
    fs, ft = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    assert torch.equal(gs(fs), fs)                  # W2 is zero-initialised
    assert global_loss(fs, ft, gs, gt).item() == pytest.approx(((fs - ft) ** 2).sum().item() / 2, rel=1e-6)


def test_gcblock_context_by_hand():
    block = GcBlock(2)
    with torch.no_grad():
        block.conv_mask.weight.copy_(torch.tensor([[[[1.0]], [[0.0]]]]))   # logits = channel 0
        block.conv_mask.bias.zero_()
    x = torch.tensor([[[[0.0, math.log(3.0)]], [[10.0, 20.0]]]])           # 2 channels, 1x2
    # softmax over positions of [0, ln 3] = [1/4, 3/4]
    ctx = block.context(x)
    assert torch.allclose(ctx.flatten(), torch.tensor([0.75 * math.log(3.0), 0.25 * 10 + 0.75 * 20]))


def test_gcblock_layout_matches_paper():
    block = GcBlock(8)
    assert block.conv_mask.out_channels == 1
    assert block.channel_add[0].out_channels == 4
    assert isinstance(block.channel_add[1], torch.nn.LayerNorm)
    assert tuple(block.channel_add[1].normalized_shape) == (4, 1, 1)
    assert torch.count_nonzero(block.channel_add[3].weight) == 0


def _info(ch):
    return ModelInfo(arch="retinanet", family="one_stage", channels=[ch, ch], strides=[8, 16])


def test_fgd_module_weights_and_adapter():
    from methods._base import DetBatch
    params = {"temp": 0.5, "alpha": 2.0, "beta": 3.0, "gamma": 5.0, "lambda": 7.0}
    torch.manual_seed(0)
    fgd = FGD(params, _info(4), _info(8))
    assert isinstance(fgd.adapters[0], torch.nn.Conv2d) and fgd.adapters[0].in_channels == 4
    fs = [torch.randn(2, 4, 4, 4), torch.randn(2, 4, 2, 2)]
    ft = [torch.randn(2, 8, 4, 4), torch.randn(2, 8, 2, 2)]
    boxes = torch.tensor([[[0, 0, 16, 16]], [[8, 8, 32, 32]]], dtype=torch.float32)
    batch = DetBatch(fs, ft, boxes, torch.ones(2, 1, dtype=torch.bool), torch.zeros(2, 1, dtype=torch.long),
                     torch.tensor([[32.0, 32.0], [32.0, 32.0]]))
    out = fgd(batch)
    # recompute with the pure functions: the module must only weight and sum over levels
    exp = {"fg": 0.0, "bg": 0.0, "att": 0.0, "glob": 0.0}
    for i in range(2):
        a = fgd.adapters[i](fs[i])
        fg, bg = focal_masks(boxes, batch.box_valid, batch.img_hw, *ft[i].shape[2:])
        for k, v in focal_losses(a, ft[i], fg, bg, 0.5).items():
            exp[k] += v.item()
        exp["glob"] += global_loss(a, ft[i], fgd.gc_student[i], fgd.gc_teacher[i]).item()
    assert out["loss_fgd_fg"].item() == pytest.approx(2.0 * exp["fg"], rel=1e-5)
    assert out["loss_fgd_bg"].item() == pytest.approx(3.0 * exp["bg"], rel=1e-5)
    assert out["loss_fgd_att"].item() == pytest.approx(5.0 * exp["att"], rel=1e-5)
    assert out["loss_fgd_glob"].item() == pytest.approx(7.0 * exp["glob"], rel=1e-5)


def test_fgd_same_channels_has_no_adapter():
    fgd = FGD({"temp": 0.5, "alpha": 1, "beta": 1, "gamma": 1, "lambda": 1}, _info(8), _info(8))
    assert all(isinstance(a, torch.nn.Identity) for a in fgd.adapters)


def test_fgd_pinned_values():
    """Golden values on fixed inputs: catches silent numeric drift of the whole FGD path."""
    torch.manual_seed(123)
    fgd = FGD({"temp": 0.5, "alpha": 1e-3, "beta": 5e-4, "gamma": 5e-4, "lambda": 5e-6}, _info(4), _info(4))
    from methods._base import DetBatch
    g = torch.Generator().manual_seed(7)
    fs = [torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 4, 4, generator=g)]
    ft = [torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 4, 4, generator=g)]
    boxes = torch.tensor([[[3, 5, 20, 30], [10, 10, 60, 40]], [[0, 0, 64, 64], [0, 0, 0, 0]]], dtype=torch.float32)
    valid = torch.tensor([[True, True], [True, False]])
    out = fgd(DetBatch(fs, ft, boxes, valid, torch.zeros(2, 2, dtype=torch.long), torch.tensor([[64.0, 64.0]] * 2)))
    got = {k: round(v.item(), 8) for k, v in out.items()}
    assert got == pytest.approx(PINNED, rel=1e-5)


PINNED = {'loss_fgd_fg': 0.02220151, 'loss_fgd_bg': 0.00178566, 'loss_fgd_att': 0.02863861, 'loss_fgd_glob': 0.00316556}
