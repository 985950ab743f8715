import torch

from dmdd.models.losses import aim_loss, cosine_distance, ngm_loss, segmentation_loss


def stages(*tensors):
    return list(tensors)


def test_cosine_distance_hand_values():
    x = torch.tensor([1.0, 0.0]).view(1, 2, 1, 1)
    assert cosine_distance(x, x).item() == 0.0
    assert cosine_distance(x, torch.tensor([0.0, 3.0]).view(1, 2, 1, 1)).item() == 1.0  # orthogonal
    assert cosine_distance(x, -2 * x).item() == 2.0  # opposite


def test_ngm_loss_zero_for_identical_and_hand_value_for_orthogonal():
    t = torch.rand(2, 4, 3, 3) + 0.1
    assert ngm_loss([t, t], [t, t], [t, t]).item() < 1e-6
    e1 = torch.tensor([1.0, 0.0]).view(1, 2, 1, 1).expand(1, 2, 2, 2)
    e2 = torch.tensor([0.0, 1.0]).view(1, 2, 1, 1).expand(1, 2, 2, 2)
    # stage 1: D^n = 0, D^a = 1; stage 2: D^n = 1, D^a = 1 -> (1 + 2) / 2
    assert abs(ngm_loss([e1, e1], [e1, e2], [e2, e2]).item() - 1.5) < 1e-6


def test_aim_loss_hand_value_and_minimised_by_maps_equal_to_the_mask():
    e1 = torch.tensor([1.0, 0.0]).view(1, 2, 1, 1).expand(1, 2, 4, 4)
    e2 = torch.tensor([0.0, 1.0]).view(1, 2, 1, 1).expand(1, 2, 4, 4)
    zero_mask, full_mask = torch.zeros(1, 1, 4, 4), torch.ones(1, 1, 4, 4)
    assert aim_loss([e1], [e2], zero_mask).item() == 1.0  # distance 1 where the mask says 0
    assert aim_loss([e1], [e2], full_mask).item() == 0.0  # distance 1 where the mask says 1
    # A half mask: student orthogonal on the anomalous half, equal elsewhere -> minimum (0).
    mask = torch.zeros(1, 1, 4, 4)
    mask[..., :, 2:] = 1
    student = torch.where(mask.bool(), e2, e1)
    assert aim_loss([e1], [student], mask).item() < 1e-6
    assert aim_loss([e1], [e1], mask).item() == 0.5


def test_segmentation_loss_hand_value():
    logits = torch.zeros(1, 1, 2, 2)  # sigmoid = 0.5 everywhere
    mask = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]])
    score = torch.tensor([0.5])
    expected = -torch.log(torch.tensor(0.5)) * 2  # BCE(0.5, .) = ln 2 for pixels and image
    assert torch.allclose(segmentation_loss(logits, score, mask), expected)
    perfect = torch.tensor([[[[20.0, -20.0], [-20.0, -20.0]]]])
    assert segmentation_loss(perfect, torch.tensor([1.0 - 1e-6]), mask).item() < 1e-5


def test_aim_target_is_the_anomalous_share_of_each_stage_cell():
    """A 4x4 defect inside one 8x8 cell of a 16 px image counts 1/4 at stage resolution 2x2 (area, no aliasing)."""
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., 2:6, 9:13] = 1.0  # wholly inside the top-right 8x8 cell
    e1 = torch.tensor([1.0, 0.0]).view(1, 2, 1, 1).expand(1, 2, 2, 2)
    # student equal to the teacher: distance 0 everywhere, so the loss is the mean target = (1/4) / 4 cells
    assert abs(aim_loss([e1], [e1], mask).item() - 0.25 / 4) < 1e-6
