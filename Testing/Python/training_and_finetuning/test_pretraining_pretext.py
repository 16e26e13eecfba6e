"""HybridMIM pretext pieces: targets match the mask geometrically, losses count what they should, gradients flow
where the authors' code had none."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from hybridmim.networks import output_layer_names
from hybridmim_training.pretraining.losses import (
    consistency_loss,
    count_loss,
    location_loss,
    masked_reconstruction_loss,
    nt_xent_loss,
)
from hybridmim_training.pretraining.masking import (
    MASK_FILL,
    apply_mask,
    patch_validity,
    random_patch_mask,
    region_slices,
    subvolume_bits,
    subvolume_targets,
    voxel_mask,
)
from hybridmim_training.pretraining.pretext import HybridMIMModel


def test_mask_ratio_is_exact_and_differs_per_sample():
    mask = random_patch_mask(4, 6, 0.4, torch.Generator().manual_seed(0))
    assert mask.shape == (4, 6, 6, 6) and mask.dtype == torch.bool
    assert mask.flatten(1).sum(1).tolist() == [round(0.4 * 216)] * 4
    assert not torch.equal(mask[0], mask[1])


def test_targets_match_the_mask_for_every_subvolume_and_bit():
    mask = random_patch_mask(3, 6, 0.5, torch.Generator().manual_seed(1))
    counts, bits = subvolume_targets(mask)
    assert counts.shape == (3, 27) and bits.shape == (3, 27, 8)
    for sample, a, b, c in itertools.product(range(3), range(3), range(3), range(3)):
        block = mask[sample, 2 * a:2 * a + 2, 2 * b:2 * b + 2, 2 * c:2 * c + 2]
        index = a * 9 + b * 3 + c
        assert counts[sample, index] == block.sum()
        for p, q, r in itertools.product(range(2), repeat=3):
            assert bits[sample, index, p * 4 + q * 2 + r] == float(block[p, q, r])


def test_raster_order_grouping_of_the_authors_is_not_what_we_build():
    """Defect 1: patches 8i..8i+7 in raster order are not sub-volume i; our targets must differ from that."""
    mask = random_patch_mask(2, 6, 0.4, torch.Generator().manual_seed(2))
    raster = mask.reshape(2, 27, 8).float()
    assert not torch.equal(subvolume_targets(mask)[1], raster)


def test_voxel_mask_is_explicit_and_masked_voxels_differ_from_data_and_padding():
    """Defect 4: the mask is a tensor, not 'voxel == 0'; an image full of real zeros stays unmasked where it is,
    and masked voxels hold a value outside the data's [0, 1] (padding and background are 0)."""
    patch_mask = torch.zeros(1, 6, 6, 6, dtype=torch.bool)
    patch_mask[0, 1, 2, 3] = True
    mask = voxel_mask(patch_mask, 4)
    assert mask.shape == (1, 1, 24, 24, 24) and mask.sum() == 4**3
    assert mask[0, 0, 4:8, 8:12, 12:16].all()
    image = torch.zeros(1, 1, 24, 24, 24)
    image[..., :12] = 5.0
    masked = apply_mask(image, mask)
    assert masked[0, 0, 4:8, 8:12, 12:16].eq(MASK_FILL).all() and MASK_FILL < 0
    assert masked[0, 0, 0, 0, :12].eq(5).all() and masked[0, 0, 0, 0, 12:].eq(0).all()


def test_reconstruction_loss_counts_only_masked_voxels():
    target = torch.rand(2, 1, 8, 8, 8)
    mask = (torch.rand(2, 1, 8, 8, 8) > 0.6).float()
    wrong_where_visible = target + 3.0 * (1 - mask)
    assert masked_reconstruction_loss(wrong_where_visible, target, mask) == 0
    off_by_one_where_masked = target + mask
    assert masked_reconstruction_loss(off_by_one_where_masked, target, mask).item() == pytest.approx(1.0)


def test_region_slices_select_the_2x2x2_subvolume_block():
    assert region_slices((1, 0, 1), 32) == (slice(32, 96), slice(0, 64), slice(32, 96))
    assert region_slices((1, 1, 0), 32, stride=16) == (slice(2, 6), slice(2, 6), slice(0, 4))


def test_consistency_term_has_gradients_on_both_heads():
    """Defect 3: the authors detached both operands of half of the term."""
    count_logits = torch.randn(2, 27, 9, requires_grad=True)
    location_logits = torch.randn(2, 27, 8, requires_grad=True)
    consistency_loss(count_logits, location_logits).backward()
    assert count_logits.grad.abs().sum() > 0 and location_logits.grad.abs().sum() > 0


def test_count_and_location_losses_are_minimal_for_correct_predictions():
    mask = random_patch_mask(2, 6, 0.4, torch.Generator().manual_seed(3))
    counts, bits = subvolume_targets(mask)
    perfect_count = torch.nn.functional.one_hot(counts, 9).float() * 50
    assert count_loss(perfect_count, counts) < 1e-6
    assert location_loss((bits * 2 - 1) * 50, bits) < 1e-6
    assert count_loss(torch.zeros(2, 27, 9), counts).item() == pytest.approx(math.log(9))


def test_nt_xent_matches_a_hand_computed_value():
    anchors = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    positives = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    t = 0.5
    # similarities (cosine / t) of row 0 (anchor 0) to: anchor 1, positive 0 (target), positive 1
    s = 1 / math.sqrt(2)
    rows = [
        (1 / t, [0 / t, 1 / t, s / t]),  # anchor 0: positive 0 is identical
        (s / t, [0 / t, 0 / t, s / t]),  # anchor 1 vs positive 1 at 45 degrees
        (1 / t, [1 / t, 0 / t, s / t]),  # positive 0 vs anchor 0
        (s / t, [s / t, s / t, s / t]),  # positive 1 is at 45 degrees to anchor 0, anchor 1 and positive 0
    ]
    expected = sum(-pos + math.log(sum(math.exp(v) for v in others)) for pos, others in rows) / 4
    assert nt_xent_loss(anchors, positives, t).item() == pytest.approx(expected, rel=1e-5)


def test_nt_xent_is_not_zero_with_distinct_samples_and_gives_gradients():
    """Defect 2: with one sample the authors' loss was exactly 0; with several samples (or ranks) ours is not."""
    anchors = torch.randn(4, 16, requires_grad=True)
    loss = nt_xent_loss(anchors, torch.randn(4, 16))
    assert loss.item() > 0.1
    loss.backward()
    assert anchors.grad.abs().sum() > 0


@pytest.mark.parametrize("architecture,args,patch", [
    ("basicunet", {"features": [8, 8, 16, 32, 64, 8], "dropout": 0.1}, 8),
    ("unet", {"channels": [8, 16, 32, 64, 128], "strides": [2, 2, 2, 2], "num_res_units": 2, "dropout": 0.1}, 8),
    ("swinunetr", {"feature_size": 12, "drop_rate": 0.1}, 16),
])
@pytest.mark.slow
def test_pretext_model_shapes_and_exported_state(architecture, args, patch):
    torch.manual_seed(0)
    model = HybridMIMModel(architecture, args, mask_patch=patch)
    crop = torch.randn(2, 1, model.crop_size, model.crop_size, model.crop_size)
    out = model(crop, (0, 1, 1))
    side = 2 * model.subvolume
    assert out.reconstruction.shape == (2, 1, side, side, side)
    assert out.count_logits.shape == (2, 27, 9) and out.location_logits.shape == (2, 27, 8)
    assert out.embedding.shape == (2, 384)
    exported = model.backbone_state_without_head()
    dropped = set(model.backbone.state_dict()) - set(exported)
    assert dropped == output_layer_names(architecture, 1, 1, **args)
    # only the output layer: a small share of the network
    assert sum(model.backbone.state_dict()[k].numel() for k in dropped) < 0.01 * sum(
        v.numel() for v in model.backbone.state_dict().values())


@pytest.mark.parametrize("architecture,args", [
    ("basicunet", {"features": [4, 4, 8, 8, 16, 4], "norm": "batch"}),
    ("unet", {"channels": [4, 8, 8, 16, 16], "strides": [2, 2, 2, 2], "num_res_units": 1, "norm": "batch"}),
])
def test_region_decoding_equals_the_full_decoder_inside_the_region(architecture, args):
    """With fixed normalisation statistics (batch norm in eval mode) the decoder restricted to a block computes
    what the full decoder computes at the block's centre: the crops line up at every level, whatever the stride of
    the first level (BasicUNet: 1, UNet: 2). (The UNet's deepest receptive field reaches the centre's edge: 2e-4.)"""
    torch.manual_seed(0)
    model = HybridMIMModel(architecture, args, mask_patch=16)
    model.eval()
    crop = torch.randn(1, 1, 96, 96, 96)
    with torch.no_grad():
        full = model.backbone(crop)
        region = model(crop, (1, 1, 0)).reconstruction  # voxels 32:96, 32:96, 0:64 of the crop
    centre = (slice(None), slice(None), slice(24, 40), slice(24, 40), slice(24, 40))
    same_place = (slice(None), slice(None), slice(56, 72), slice(56, 72), slice(24, 40))
    assert torch.allclose(region[centre], full[same_place], atol=1e-3)
    assert not torch.allclose(region[centre], full[centre], atol=1e-2)  # and not some other place


@pytest.mark.slow
def test_the_second_pass_computes_the_same_bottleneck_without_the_skip_encoders():
    """SwinUNETR's embedding pass skips the four convolutional skip encoders and gives the same bottleneck."""
    torch.manual_seed(0)
    model = HybridMIMModel("swinunetr", {"feature_size": 12, "drop_rate": 0.1}, mask_patch=16).eval()
    crop = torch.randn(1, 1, 96, 96, 96)
    called = []
    hooks = [getattr(model.backbone, name).register_forward_hook(lambda *_: called.append(1))
             for name in ("encoder1", "encoder2", "encoder3", "encoder4")]
    with torch.no_grad():
        bottleneck = model.parts.encode_bottleneck(crop)
        assert not called
        assert torch.allclose(bottleneck, model.parts.encode(crop)[-1], atol=1e-5) and called
    for hook in hooks:
        hook.remove()


def test_networks_without_encoder_decoder_parts_or_with_uneven_pooling_are_refused_by_name():
    from hybridmim.errors import ModelCardError

    with pytest.raises(ModelCardError, match="'segresnet' cannot be run as encoder and decoder.*basicunet, swinunetr"
                                             ", unet"):
        HybridMIMModel("segresnet", {"init_filters": 8}, mask_patch=8)
    with pytest.raises(ModelCardError, match=r"pools the axes differently"):
        HybridMIMModel("unet", {"channels": [8, 16, 32], "strides": [[2, 2, 1], 2]}, mask_patch=8)


def test_padding_patches_are_never_masked_and_region_targets_leave_them_out():
    """A crop whose last two patch planes are padding: exactly round(ratio * n) of its n real patches are masked,
    none in the padding, and the count/location/consistency terms ignore what the weights leave out."""
    valid = torch.ones(2, 1, 48, 48, 48)
    valid[0, :, 32:] = 0  # sample 0: patches 4 and 5 along the first axis are padding only
    valid[1, :, 30:] = 0  # sample 1: patch 3 keeps two real planes, so only patches 4 and 5 are padding
    allowed = patch_validity(valid, 8)
    assert allowed[0, :4].all() and not allowed[0, 4:].any() and allowed[1, 3].all() and not allowed[1, 4:].any()
    mask = random_patch_mask(2, 6, 0.4, torch.Generator().manual_seed(0), allowed)
    assert mask.sum((1, 2, 3)).tolist() == [round(0.4 * 144)] * 2 and not (mask & ~allowed).any()
    counts, bits = subvolume_targets(mask)
    weights = subvolume_bits(allowed).float()
    logits_count, logits_location = torch.randn(2, 27, 9), torch.randn(2, 27, 8)
    changed_count, changed_location = logits_count.clone(), logits_location.clone()
    out = weights == 0
    changed_location[out] = 50.0  # nonsense where only padding is
    changed_count[(weights.sum(-1) == 0)] = 50.0
    count_weights = (weights.sum(-1) > 0).float()
    assert count_weights.sum() == 2 * 18  # a third of the sub-volumes are padding only
    assert torch.isclose(location_loss(logits_location, bits, weights),
                         location_loss(changed_location, bits, weights))
    assert torch.isclose(count_loss(logits_count, counts, count_weights),
                         count_loss(changed_count, counts, count_weights))
    assert torch.isclose(consistency_loss(logits_count, logits_location, weights),
                         consistency_loss(changed_count, changed_location, weights))
    assert not torch.isclose(location_loss(logits_location, bits), location_loss(changed_location, bits))
