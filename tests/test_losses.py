"""Tokenizer losses: LPIPS loading, PatchGAN layout and official logits, GAN terms, adaptive weight, LeCAM."""
import os

import lpips
import pytest
import torch
from torchvision.models import vgg

from common.errors import ConfigError, WeightsError
from common.losses import (DISC_LOSSES, GEN_LOSSES, LPIPS, LeCAMRegularizer, NLayerDiscriminator,
                           adaptive_generator_weight, hinge_d_loss, hinge_g_loss,
                           image_mean_non_saturating_g_loss, vanilla_d_loss)

DATA = os.path.join(os.path.dirname(__file__), "data", "losses")


def read_key_listing(name: str) -> dict[str, tuple[int, ...]]:
    shapes = {}
    with open(os.path.join(DATA, name)) as f:
        for line in f:
            key, shape, _ = line.split()
            shapes[key] = tuple(int(s) for s in shape.strip("[]").split(",") if s)
    return shapes


@pytest.fixture(scope="module")
def lfq_gan():
    return torch.load(os.path.join(DATA, "lfq_small_gan.pt"), weights_only=True)


# --------------------------------------------------------------------------- LPIPS

@pytest.fixture(scope="module")
def vgg_file(tmp_path_factory):
    """A random torchvision VGG16 `features` state dict, saved like the published file."""
    torch.manual_seed(0)
    features = vgg.make_layers(vgg.cfgs["D"])
    path = tmp_path_factory.mktemp("vgg") / "vgg16-397923af.pth"
    torch.save({f"features.{k}": v for k, v in features.state_dict().items()}, path)
    return str(path), features


def test_lpips_loads_torchvision_vgg16_and_matches_lpips_package(vgg_file):
    path, features = vgg_file
    ours = LPIPS(vgg_weights=path)
    reference = lpips.LPIPS(net="vgg", pnet_rand=True, verbose=False)
    for trunk_slice in (reference.net.slice1, reference.net.slice2, reference.net.slice3,
                        reference.net.slice4, reference.net.slice5):
        for index, layer in trunk_slice.named_children():
            layer.load_state_dict(features[int(index)].state_dict())
    torch.manual_seed(1)
    x, y = torch.rand(2, 3, 3, 32, 32) * 2 - 1
    distances = ours(x, y)
    assert distances.shape == (3,)
    torch.testing.assert_close(distances, reference(x, y).flatten(), rtol=0, atol=0)

    ours.train()
    assert not ours.training and not ours.lpips.lin0.model[0].training
    assert not any(p.requires_grad for p in ours.parameters())
    x.requires_grad_(True)
    ours(x, y).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_lpips_missing_vgg_file_names_file_and_hub_path(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(WeightsError, match="vgg16-397923af.pth") as info:
        LPIPS()
    assert os.path.join(str(tmp_path), "hub", "checkpoints") in str(info.value)
    with pytest.raises(WeightsError, match="--vgg-weights"):
        LPIPS(vgg_weights=str(tmp_path / "nowhere.pth"))


def test_lpips_refuses_a_file_that_is_not_vgg16(tmp_path):
    path = tmp_path / "vgg16-397923af.pth"
    torch.save({"features.0.weight": torch.zeros(1)}, path)
    with pytest.raises(WeightsError, match="not a torchvision VGG16"):
        LPIPS(vgg_weights=str(path))
    path.write_bytes(b"garbage")
    with pytest.raises(WeightsError, match=str(path)):
        LPIPS(vgg_weights=str(path))


def test_lpips_random_trunk_warns_and_identical_images_are_zero():
    with pytest.warns(UserWarning, match="RANDOM VGG16"):
        metric = LPIPS(random_trunk=True)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert torch.equal(metric(x, x), torch.zeros(2))


# --------------------------------------------------------------------------- discriminator

@pytest.mark.parametrize("n_layers, listing", [(2, "rqvae_ffhq256_stage1_discriminator.txt"),
                                               (3, "openmagvit2_lfq_256_discriminator.txt")])
def test_discriminator_has_official_keys_and_shapes(n_layers, listing):
    disc = NLayerDiscriminator(ndf=64, n_layers=n_layers)
    ours = {k: tuple(v.shape) for k, v in disc.state_dict().items()}
    assert ours == read_key_listing(listing)


def test_discriminator_lfq_size_and_logit_map():
    disc = NLayerDiscriminator(ndf=64, n_layers=3)
    assert sum(p.numel() for p in disc.parameters()) == 2_765_633
    assert disc(torch.zeros(1, 3, 64, 64)).shape == (1, 1, 6, 6)  # 30x30 at 256


def test_discriminator_init_follows_pix2pix():
    torch.manual_seed(0)
    disc = NLayerDiscriminator(ndf=64, n_layers=3)
    conv, bn = disc.main[8], disc.main[9]
    assert abs(conv.weight.std().item() - 0.02) < 1e-3 and abs(conv.weight.mean().item()) < 1e-3
    assert abs(bn.weight.mean().item() - 1.0) < 5e-3 and abs(bn.weight.std().item() - 0.02) < 5e-3
    assert torch.equal(bn.bias, torch.zeros(512))


def test_discriminator_loads_official_rqvae_weights():
    state = torch.load(os.path.join(DATA, "rqvae_tiny_discriminator.pt"), weights_only=True)
    disc = NLayerDiscriminator(ndf=8, n_layers=2)
    disc.load_state_dict(state, strict=True)


def test_discriminator_reproduces_official_lfq_logits(lfq_gan):
    disc = NLayerDiscriminator(ndf=16, n_layers=1)
    disc.load_state_dict(lfq_gan["discriminator"], strict=True)
    disc.train()  # batch statistics, real and fake in separate calls as in the official loss
    with torch.no_grad():
        real, fake = disc(lfq_gan["images"]), disc(lfq_gan["rec"])
    torch.testing.assert_close(real, lfq_gan["disc_logits_real"], rtol=0, atol=1e-5)
    torch.testing.assert_close(fake, lfq_gan["disc_logits_fake"], rtol=0, atol=1e-5)


def test_actnorm_discriminator_initialises_from_first_training_batch():
    torch.manual_seed(0)
    disc = NLayerDiscriminator(ndf=8, n_layers=2, use_actnorm=True)
    assert {"main.3.loc", "main.3.scale", "main.3.initialized", "main.2.bias"} <= set(disc.state_dict())
    actnorm = disc.main[3]
    hidden = disc.main[:3]
    x = torch.randn(4, 3, 32, 32) * 3 + 1
    disc.eval()
    disc(x)
    assert actnorm.initialized.item() == 0
    disc.train()
    disc(x)
    assert actnorm.initialized.item() == 1
    with torch.no_grad():
        out = actnorm(hidden(x)).transpose(0, 1).flatten(1)
    torch.testing.assert_close(out.mean(1), torch.zeros(16), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.std(1), torch.ones(16), atol=1e-4, rtol=0)
    loc = actnorm.loc.clone()
    disc(x * 2)
    assert torch.equal(actnorm.loc, loc)


def test_discriminator_rejects_zero_layers():
    with pytest.raises(ConfigError, match="n_layers"):
        NLayerDiscriminator(n_layers=0)


# --------------------------------------------------------------------------- GAN losses

def test_gan_terms_match_official_values(lfq_gan):
    real, fake = lfq_gan["disc_logits_real"], lfq_gan["disc_logits_fake"]
    assert image_mean_non_saturating_g_loss(fake).item() == pytest.approx(lfq_gan["g_loss_non_saturating"], rel=1e-5)
    assert hinge_d_loss(real, fake).item() == pytest.approx(lfq_gan["d_loss_hinge"], rel=1e-5)
    lecam = LeCAMRegularizer()
    lecam.update(real, fake)
    assert lecam.ema_real == pytest.approx(lfq_gan["lecam_ema_real_after_1_update"], rel=1e-5)
    assert lecam.ema_fake == pytest.approx(lfq_gan["lecam_ema_fake_after_1_update"], rel=1e-5)
    assert lecam.loss(real, fake).item() == pytest.approx(lfq_gan["lecam_reg"], rel=1e-5)


def test_simple_gan_losses_and_name_maps():
    real = torch.tensor([[2.0, 0.5], [-1.0, 0.0]])
    fake = torch.tensor([[-2.0, 0.5], [1.0, 3.0]])
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * ((0 + 0.5 + 2 + 1) / 4 + (0 + 1.5 + 2 + 4) / 4))
    softplus = torch.nn.functional.softplus
    assert vanilla_d_loss(real, fake).item() == pytest.approx(
        0.5 * (softplus(-real).mean() + softplus(fake).mean()).item())
    assert hinge_g_loss(fake).item() == pytest.approx(-0.625)
    assert GEN_LOSSES["vanilla"] is hinge_g_loss and GEN_LOSSES["hinge"] is hinge_g_loss
    assert DISC_LOSSES["hinge"] is hinge_d_loss and DISC_LOSSES["vanilla"] is vanilla_d_loss


def test_non_saturating_g_loss_averages_logits_before_softplus():
    logits = torch.tensor([[[[4.0, -4.0]]], [[[1.0, 1.0]]]])  # (2, 1, 1, 2); image means 0 and 1
    expected = (torch.nn.functional.softplus(torch.tensor(0.0)) + torch.nn.functional.softplus(torch.tensor(-1.0))) / 2
    assert image_mean_non_saturating_g_loss(logits).item() == pytest.approx(expected.item())
    per_patch = torch.nn.functional.softplus(-logits).mean()
    assert abs(per_patch.item() - expected.item()) > 0.1
    assert torch.isfinite(image_mean_non_saturating_g_loss(torch.full((2, 1, 3, 3), -1e4)))
    d_loss = DISC_LOSSES["non_saturate"](logits, -logits)
    assert d_loss.item() == pytest.approx(2 * expected.item())


def test_adaptive_generator_weight_is_gradient_norm_ratio():
    last_layer = torch.nn.Parameter(torch.ones(3))
    a, b = torch.tensor([3.0, 0.0, 4.0]), torch.tensor([0.0, 1.0, 0.0])
    nll, g = (last_layer * a).sum(), (last_layer * b).sum()
    weight = adaptive_generator_weight(nll, g, last_layer)
    assert weight.item() == pytest.approx(5.0 / (1.0 + 1e-4))
    assert not weight.requires_grad
    (nll + weight * g).backward()  # the graph was kept for the real backward pass
    assert torch.equal(last_layer.grad, a + weight * b)
    nll, flat_g = (last_layer * a).sum(), (last_layer * torch.zeros(3)).sum()
    assert adaptive_generator_weight(nll, flat_g, last_layer).item() == 1e4


def test_lecam_state_dict_resumes_exactly():
    torch.manual_seed(0)
    batches = [(torch.randn(2, 1, 4, 4) + 1, torch.randn(2, 1, 4, 4) - 1) for _ in range(6)]
    straight = LeCAMRegularizer()
    for real, fake in batches:
        straight.update(real, fake)
    first = LeCAMRegularizer()
    for real, fake in batches[:3]:
        first.update(real, fake)
    resumed = LeCAMRegularizer()
    resumed.load_state_dict(first.state_dict())
    for real, fake in batches[3:]:
        resumed.update(real, fake)
    assert resumed.state_dict() == straight.state_dict()
    real, fake = batches[0]
    assert torch.equal(resumed.loss(real, fake), straight.loss(real, fake))
