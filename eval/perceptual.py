"""LPIPS (VGG variant, v0.1) with every weight read from local files.

The ``lpips`` wheel ships only the small linear heads; its VGG16 backbone would be downloaded by torchvision.
Here the backbone comes from a torchvision ``vgg16`` state dict given by path (``features.N.weight`` keys,
e.g. torchvision's ``vgg16-397923af.pth``), so nothing is downloaded.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import torch

VGG16_HELP = ("LPIPS needs torchvision's VGG16 weights (a state dict such as vgg16-397923af.pth from "
              "https://download.pytorch.org/models/vgg16-397923af.pth), given with --lpips-vgg PATH")

# lpips' vgg16 keeps torchvision's layer indices inside five slices: features.i -> net.slice{s}.i
_LPIPS_SLICE_ENDS = (4, 9, 16, 23, 30)


def _lpips_backbone_key(torchvision_key: str) -> str | None:
    parts = torchvision_key.split(".")
    if len(parts) != 3 or parts[0] != "features":
        return None
    index = int(parts[1])
    slice_number = next(s for s, end in enumerate(_LPIPS_SLICE_ENDS, start=1) if index < end)
    return f"net.slice{slice_number}.{index}.{parts[2]}"


class LPIPSVGG(torch.nn.Module):
    """LPIPS distance of (N, H, W, 3) uint8 / [0, 255] image pairs, mapped to [-1, 1] as lpips expects."""

    def __init__(self, vgg16_path: str | os.PathLike | None):
        super().__init__()
        if vgg16_path is None or not Path(vgg16_path).is_file():
            raise FileNotFoundError(f"VGG16 weights not found: {vgg16_path}. {VGG16_HELP}")
        import lpips

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # torchvision's note on the deprecated 'pretrained'
            self.model = lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False)
        vgg_state = torch.load(vgg16_path, map_location="cpu", weights_only=True)
        backbone = {_lpips_backbone_key(k): v for k, v in vgg_state.items() if _lpips_backbone_key(k)}
        expected = {k for k in self.model.state_dict() if k.startswith("net.")}
        if set(backbone) != expected:
            raise ValueError(f"{vgg16_path} is not a torchvision VGG16 state dict: "
                             f"missing {sorted(expected - set(backbone))[:3]}")
        self.model.load_state_dict(backbone, strict=False)
        self.model.requires_grad_(False).eval()

    @torch.no_grad()
    def forward(self, images1, images2) -> np.ndarray:
        device = next(self.model.parameters()).device

        def to_unit(images) -> torch.Tensor:
            images = torch.as_tensor(np.asarray(images)).to(device).permute(0, 3, 1, 2).float()
            return images / 127.5 - 1

        return self.model(to_unit(images1), to_unit(images2)).flatten().cpu().numpy()
