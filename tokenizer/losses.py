"""Training losses of the tokenizer: pixel, LPIPS, Inception features, and the PatchGAN with adaptive weight.

The released recipe (SPEC.md section 6): L2 pixel loss, LPIPS(VGG) weight 1 and the Inception pool-feature
MSE weight 1 from step 0, and a hinge PatchGAN whose generator term is scaled by the adaptive weight
(ratio of gradient norms at the decoder's last conv, clamped to [0, 1e4]) times 0.3 from step 600k, with
generator and discriminator steps alternating. Each term has a weight (0 turns it off) and a start step.

Discriminator schedule (`gan_schedule`). The release alternates once the GAN is on: a tokenizer step on one
batch, then a discriminator step on the next batch, whose reconstruction it computes with a second tokenizer
forward (with gradients and the perceptual loss, which are then thrown away). `alternate` does the same (the
second forward without gradients): per tokenizer update, two batches and two tokenizer forwards. `same_batch`
(default) updates the tokenizer and then the discriminator on the same batch's real images and detached
reconstruction, so one forward serves both updates. The math per update pair is the release's except that the
discriminator sees the reconstruction from before the tokenizer update (one step older, lr 5e-5) and the
tokenizer's batch instead of a fresh one; a step then holds one update of each. The release's 1M steps
(600k tokenizer-only, then 200k tokenizer + 200k discriminator updates) are 800k `same_batch` steps.

No loss network is ever downloaded: LPIPS takes torchvision's VGG16 state dict from `lpips_vgg16` (the small
linear heads come from the installed `lpips` package), the feature loss takes TF-Inception weights from
`inception_weights` (any file `eval.inception` reads). `random_init: true` builds both with random weights,
which only makes sense for timing and smoke runs, and is logged as such.

Inception input scaling (`feature_input_range`): the network expects [0, 255] images. The released code fed
255 * (x + 1), i.e. [0, 510]; `0_255` (default) feeds 127.5 * (x + 1), the range the network was trained on
and the one FID uses. `0_510` reproduces the release. The released code also left Inception's BatchNorm in
training mode (batch statistics); here it always uses its stored statistics.
"""
from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

logger = logging.getLogger("gpstoken.train")

FEATURE_INPUT_SCALE = {"0_255": 127.5, "0_510": 255.0}


@dataclass
class LossConfig:
    pixel: str = "l2"                    # l2 (released) | l1 (paper option)
    pixel_weight: float = 1.0
    lpips_weight: float = 1.0
    lpips_start: int = 0
    lpips_vgg16: str = ""                # torchvision vgg16 state dict (e.g. vgg16-397923af.pth)
    feature_weight: float = 1.0          # MSE of Inception 2048-d pool features
    feature_start: int = 0
    inception_weights: str = ""          # any weight file eval.inception reads
    feature_input_range: str = "0_255"   # 0_255 (correct, default) | 0_510 (released)
    gan_weight: float = 0.3              # times the adaptive weight; 0 disables the discriminator
    gan_start: int = 600_000
    disc_layers: int = 3
    disc_channels: int = 64
    gan_schedule: str = "same_batch"     # same_batch (one forward per update pair) | alternate (released)
    random_init: bool = False            # loss networks with random weights: timing only

    def __post_init__(self) -> None:
        if self.pixel not in ("l2", "l1"):
            raise ValueError(f"losses.pixel must be 'l2' or 'l1', got {self.pixel!r}")
        if self.gan_schedule not in ("same_batch", "alternate"):
            raise ValueError(f"losses.gan_schedule must be 'same_batch' or 'alternate', got {self.gan_schedule!r}")
        if self.feature_input_range not in FEATURE_INPUT_SCALE:
            raise ValueError(f"losses.feature_input_range must be one of {list(FEATURE_INPUT_SCALE)}, "
                             f"got {self.feature_input_range!r}")
        for key in ("pixel_weight", "lpips_weight", "feature_weight", "gan_weight"):
            if getattr(self, key) < 0:
                raise ValueError(f"losses.{key} must be >= 0, got {getattr(self, key)}")
        if not self.random_init:
            if self.lpips_weight > 0 and not self.lpips_vgg16:
                raise ValueError("losses.lpips_weight > 0 needs losses.lpips_vgg16 = path of torchvision's VGG16 "
                                 "state dict (nothing is downloaded), or losses.random_init: true for timing")
            if self.feature_weight > 0 and not self.inception_weights:
                raise ValueError("losses.feature_weight > 0 needs losses.inception_weights = path of the TF-Inception "
                                 "weights (nothing is downloaded), or losses.random_init: true for timing")

    def gan_active(self, step: int) -> bool:
        return self.gan_weight > 0 and step > self.gan_start

    def is_discriminator_step(self, step: int) -> bool:
        """`alternate`: once the GAN is on, even steps train the discriminator on a batch of their own and odd
        steps the tokenizer (as released)."""
        return self.gan_schedule == "alternate" and self.gan_active(step) and step % 2 == 0

    def discriminator_follows(self, step: int) -> bool:
        """`same_batch`: once the GAN is on, the tokenizer update of every step is followed by a discriminator
        update on the same batch."""
        return self.gan_schedule == "same_batch" and self.gan_active(step)


def at_least_float32(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` in float32, or float64 when it is that: losses are summed in full precision."""
    return tensor.to(torch.promote_types(tensor.dtype, torch.float32))


# --------------------------------------------------------------------------------------------------------------
# Perceptual networks (frozen)
# --------------------------------------------------------------------------------------------------------------

class LPIPSLoss(nn.Module):
    """Mean LPIPS (VGG, v0.1) between images in [-1, 1]; differentiable w.r.t. the reconstruction."""

    def __init__(self, vgg16_path: str = "", random_init: bool = False):
        super().__init__()
        if random_init:
            import lpips

            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                # pnet_rand: random VGG, nothing downloaded; the linear heads come from the lpips package
                self.network = lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False)
            logger.warning("LPIPS runs with a RANDOM VGG16 backbone (random_init): for timing only")
        else:
            from eval.perceptual import LPIPSVGG   # the one place that maps torchvision VGG16 keys into lpips

            self.network = LPIPSVGG(vgg16_path).model
        self.network.requires_grad_(False).eval()

    def train(self, mode: bool = True) -> "LPIPSLoss":
        return super().train(False)   # frozen: dropout off whatever the trainer does

    def forward(self, reconstruction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.network(reconstruction, target).mean()


class InceptionFeatureLoss(nn.Module):
    """MSE between the TF-Inception 2048-d pool features of reconstruction and target (images in [-1, 1])."""

    def __init__(self, weights_path: str = "", input_range: str = "0_255", random_init: bool = False):
        super().__init__()
        from eval.inception import InceptionFeatureExtractor, TFInceptionV3, preprocess

        self._preprocess = preprocess
        if random_init:
            self.network = TFInceptionV3(with_logits=False)
            logger.warning("the Inception feature loss runs with RANDOM weights (random_init): for timing only")
        else:
            self.network = InceptionFeatureExtractor(weights_path).network
        self.network.requires_grad_(False).eval()
        self.scale = FEATURE_INPUT_SCALE[input_range]

    def train(self, mode: bool = True) -> "InceptionFeatureLoss":
        return super().train(False)   # BatchNorm keeps its stored statistics

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return at_least_float32(self.network(self._preprocess(self.scale * (images + 1))).pool)

    def forward(self, reconstruction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            target_features = self.features(target)
        return F.mse_loss(self.features(reconstruction), target_features)


# --------------------------------------------------------------------------------------------------------------
# PatchGAN
# --------------------------------------------------------------------------------------------------------------

class PatchDiscriminator(nn.Module):
    """PatchGAN (pix2pix layout): 4x4 convs, stride 2 for `layers` levels then two stride-1 convs, BatchNorm
    and LeakyReLU(0.2) between them, one logit per patch. Weights drawn from N(0, 0.02) (BatchNorm scales from
    N(1, 0.02))."""

    def __init__(self, layers: int = 3, channels: int = 64, in_channels: int = 3):
        super().__init__()
        blocks: list[nn.Module] = [nn.Conv2d(in_channels, channels, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        width = channels
        for level in range(1, layers + 1):
            out = channels * min(2 ** level, 8)
            stride = 2 if level < layers else 1
            blocks += [nn.Conv2d(width, out, 4, stride, 1, bias=False), nn.BatchNorm2d(out), nn.LeakyReLU(0.2, True)]
            width = out
        blocks.append(nn.Conv2d(width, 1, 4, 1, 1))
        self.main = nn.Sequential(*blocks)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, 0.0, 0.02)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.normal_(module.weight, 1.0, 0.02)
                nn.init.zeros_(module.bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.main(images)


def hinge_discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean())


def adaptive_gan_weight(reconstruction: torch.Tensor, reconstruction_grad: torch.Tensor, generator_grad: torch.Tensor,
                        last_layer: torch.Tensor) -> torch.Tensor:
    """||d rec / d w|| / (||d gan / d w|| + 1e-4) at the last decoder weight w, clamped to [0, 1e4], detached.

    The two losses enter through their gradients at the reconstruction (the output of the layer that owns w),
    so each weight gradient is one backward step through that layer only."""
    def at_weight(image_grad: torch.Tensor) -> torch.Tensor:
        grad_output = image_grad.to(reconstruction.dtype)
        return torch.autograd.grad(reconstruction, last_layer, grad_output, retain_graph=True)[0]

    ratio = at_weight(reconstruction_grad).norm() / (at_weight(generator_grad).norm() + 1e-4)
    return ratio.clamp(0.0, 1e4).detach()


# --------------------------------------------------------------------------------------------------------------
# The combination
# --------------------------------------------------------------------------------------------------------------

class TokenizerLosses(nn.Module):
    """All terms of the tokenizer objective, each weighted and switched on at its start step."""

    def __init__(self, config: LossConfig):
        super().__init__()
        self.config = config
        self.lpips = LPIPSLoss(config.lpips_vgg16, config.random_init) if config.lpips_weight > 0 else None
        self.features = (InceptionFeatureLoss(config.inception_weights, config.feature_input_range,
                                              config.random_init) if config.feature_weight > 0 else None)

    def pixel_loss(self, reconstruction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        difference = at_least_float32(reconstruction) - at_least_float32(target)
        return difference.abs().mean() if self.config.pixel == "l1" else difference.square().mean()

    def generator_loss(self, reconstruction: torch.Tensor, target: torch.Tensor, step: int,
                       discriminator: nn.Module | None = None,
                       last_layer: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(loss, terms) for a tokenizer step. `discriminator` (unwrapped, frozen for this call) and the
        decoder's last conv weight `last_layer` (the layer that outputs `reconstruction`) are needed once the
        GAN is active.

        The loss networks run on a detached copy of the reconstruction and each term's gradient at the image is
        taken right away, so LPIPS, Inception and the discriminator each run one backward pass. The returned
        loss has the value of the weighted sum and, as its gradient at `reconstruction`, the weighted sum of
        those image gradients: its backward pass is the tokenizer's alone. This is the plain objective's
        gradient exactly; what it saves is the adaptive GAN weight's cost, which through the plain objective
        (`autograd.grad` of each term at the last weight) runs LPIPS's and the discriminator's backward passes
        a second time."""
        config = self.config
        image = at_least_float32(reconstruction.detach()).requires_grad_(True)

        def image_grad(loss: torch.Tensor) -> torch.Tensor:
            return torch.autograd.grad(loss, image)[0]

        terms = {"pixel": self.pixel_loss(image, target)}
        reconstruction_loss = config.pixel_weight * terms["pixel"]
        if self.lpips is not None and step > config.lpips_start:
            terms["lpips"] = at_least_float32(self.lpips(image, target))
            reconstruction_loss = reconstruction_loss + config.lpips_weight * terms["lpips"]
        total, reconstruction_grad = reconstruction_loss.detach(), image_grad(reconstruction_loss)
        gradient = reconstruction_grad
        if self.features is not None and step > config.feature_start:
            terms["inception_features"] = self.features(image, target)
            total = total + config.feature_weight * terms["inception_features"].detach()
            gradient = gradient + config.feature_weight * image_grad(terms["inception_features"])
        if config.gan_active(step):
            discriminator.requires_grad_(False)
            terms["gan_generator"] = -at_least_float32(discriminator(image)).mean()
            discriminator.requires_grad_(True)
            generator_grad = image_grad(terms["gan_generator"])
            terms["gan_adaptive_weight"] = adaptive_gan_weight(reconstruction, reconstruction_grad, generator_grad,
                                                               last_layer)
            scale = config.gan_weight * terms["gan_adaptive_weight"]
            total = total + scale * terms["gan_generator"].detach()
            gradient = gradient + scale * generator_grad
        pushed = (at_least_float32(reconstruction) * gradient).sum()
        return total + (pushed - pushed.detach()), {name: value.detach() for name, value in terms.items()}

    def discriminator_loss(self, discriminator: nn.Module, reconstruction: torch.Tensor,
                           target: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        real = at_least_float32(discriminator(target.detach()))
        fake = at_least_float32(discriminator(reconstruction.detach()))
        loss = hinge_discriminator_loss(real, fake)
        return loss, {"gan_discriminator": loss, "logits_real": real.mean().detach(),
                      "logits_fake": fake.mean().detach()}
