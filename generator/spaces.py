"""What each generator stage's flow runs on: the map from stored tokens to the flow's tensors and back.

Three stages share the trainer and the sampler; they differ only in this map.

* `TextureSpace` (stage 2 of the paper, the released SiT-XL-gs): the flow generates the 5 + C token channels,
  geometry as residuals over the layout, all standardised (`generator.flow.normalize_tokens`); the layout (the
  init geometry) is the condition. The texture model has no positional embedding, so it is equivariant to the
  token order: the stored (partition) order is used as is.
* `LayoutSpace` (stage 1): the flow generates the init geometry itself, standardised per channel with the
  layout statistics of the shards.
* `JointSpace` (the one-stage baseline of the paper's ablation): the flow generates all 5 + C channels of the
  tokens with no layout; geometry standardised with the layout statistics (tokens' geometry is the init
  geometry plus a small refinement), texture with the token statistics.

Token order for the stages without a layout. Tokens are a set; a transformer with a learned positional
embedding needs *some* order, and the order decides how hard the learning problem is. We sort each layout into
a canonical raster order of the token centres (mu_y, then mu_x, then larger regions first): partition regions
are disjoint, so their centres are distinct and the order is unique, and the sorted sequence varies smoothly
with the image (token k sits roughly at the same place in every image), which a positional embedding can
exploit. The released partition order (the order in which the greedy halving created the regions) depends on
the entropy ranking and scatters neighbours across the sequence; an order-free (set) loss would need a matching
step per sample. The sampled layout goes through `generator.calibration`, which does not care about the order.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from .flow import GEOMETRY_DIM, RHO_RANGE, SIGMA_RANGE, TokenStats, channel_constants, normalize_tokens, \
    postprocess_tokens

__all__ = ["STAGES", "FlowSpace", "TextureSpace", "LayoutSpace", "JointSpace", "canonical_order",
           "sort_canonically"]

STAGES = ("texture", "layout", "one_stage")


def canonical_order(geometry: torch.Tensor) -> torch.Tensor:
    """(B, N) permutation sorting each layout (B, N, >= 5) by mu_y, then mu_x, then area (larger first)."""
    area = geometry[..., 0] * geometry[..., 1]
    order = torch.argsort(-area, dim=1, stable=True)
    for key in (geometry[..., 3], geometry[..., 4]):  # least significant key first (stable sorts)
        order = torch.gather(order, 1, torch.argsort(torch.gather(key, 1, order), dim=1, stable=True))
    return order


def sort_canonically(*tensors: torch.Tensor, by: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Reorder the tokens of each (B, N, ...) tensor by the canonical order of the layout `by` (B, N, 5)."""
    order = canonical_order(by)
    return tuple(torch.gather(t, 1, order[..., None].expand(-1, -1, t.shape[-1])) for t in tensors)


def _standardise(x: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    return (x - channel_constants(mean, x)) / channel_constants(std, x)


def _destandardise(x: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    return x * channel_constants(std, x) + channel_constants(mean, x)


class FlowSpace(Protocol):
    """Map between a batch of shard items and the flow's data (and its condition), and back."""

    stage: str
    channels: int

    def to_flow(self, tokens: torch.Tensor, layout: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Stored tokens (B, N, 5 + C) and layout (B, N, 5) -> (flow data (B, N, channels), condition or None)."""
        ...


@dataclass(frozen=True)
class TextureSpace:
    """Normalised token channels given the layout (released normalisation, SPEC.md section 7)."""

    stats: TokenStats
    stage: str = "texture"

    @property
    def channels(self) -> int:
        return len(self.stats.mean)

    def to_flow(self, tokens: torch.Tensor, layout: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return normalize_tokens(tokens, layout, self.stats), layout

    def to_tokens(self, samples: torch.Tensor, layout: torch.Tensor) -> torch.Tensor:
        """Generated samples + their layout -> decodable tokens (de-normalise, add the layout, clamp)."""
        return postprocess_tokens(samples, layout, self.stats)


@dataclass(frozen=True)
class LayoutSpace:
    """The init geometry, canonically ordered and standardised per channel."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    stage: str = "layout"
    channels: int = GEOMETRY_DIM

    def to_flow(self, tokens: torch.Tensor, layout: torch.Tensor) -> tuple[torch.Tensor, None]:
        (ordered,) = sort_canonically(layout, by=layout)
        return _standardise(ordered, self.mean, self.std), None

    def to_layout(self, samples: torch.Tensor) -> torch.Tensor:
        """Generated samples (B, N, 5) -> raw (uncalibrated) layouts in tile coordinates."""
        return _destandardise(samples, self.mean, self.std)


@dataclass(frozen=True)
class JointSpace:
    """All token channels without a layout (one-stage baseline), canonically ordered by the init geometry."""

    stats: TokenStats                  # texture channels: token statistics
    layout_mean: tuple[float, ...]     # geometry channels: layout statistics
    layout_std: tuple[float, ...]
    stage: str = "one_stage"

    @property
    def channels(self) -> int:
        return len(self.stats.mean)

    @property
    def _mean_std(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        return (self.layout_mean + self.stats.mean[GEOMETRY_DIM:], self.layout_std + self.stats.std[GEOMETRY_DIM:])

    def to_flow(self, tokens: torch.Tensor, layout: torch.Tensor) -> tuple[torch.Tensor, None]:
        (ordered,) = sort_canonically(tokens, by=layout)
        return _standardise(ordered, *self._mean_std), None

    def to_tokens(self, samples: torch.Tensor, layout: None = None) -> torch.Tensor:
        """Generated samples -> decodable tokens: de-normalise, clamp sigma and rho as the release does."""
        tokens = _destandardise(samples, *self._mean_std)
        return torch.cat([tokens[..., 0:2].clamp(*SIGMA_RANGE), tokens[..., 2:3].clamp(*RHO_RANGE),
                          tokens[..., 3:]], dim=-1)


def space_to_dict(space: TextureSpace | LayoutSpace | JointSpace) -> dict:
    """JSON-safe description of a space (saved next to a trained model: sampling needs no shards)."""
    if isinstance(space, TextureSpace):
        return {"stage": "texture", "mean": list(space.stats.mean), "std": list(space.stats.std)}
    if isinstance(space, LayoutSpace):
        return {"stage": "layout", "mean": list(space.mean), "std": list(space.std)}
    return {"stage": "one_stage", "mean": list(space.stats.mean), "std": list(space.stats.std),
            "layout_mean": list(space.layout_mean), "layout_std": list(space.layout_std)}


def space_from_dict(data: dict, where: str = "flow space") -> TextureSpace | LayoutSpace | JointSpace:
    try:
        stage = data["stage"]
        if stage == "texture":
            return TextureSpace(TokenStats(tuple(data["mean"]), tuple(data["std"])))
        if stage == "layout":
            return LayoutSpace(tuple(data["mean"]), tuple(data["std"]))
        if stage == "one_stage":
            return JointSpace(TokenStats(tuple(data["mean"]), tuple(data["std"])), tuple(data["layout_mean"]),
                              tuple(data["layout_std"]))
    except (KeyError, TypeError) as error:
        raise ValueError(f"{where}: malformed ({error!r})") from error
    raise ValueError(f"{where}: unknown stage {stage!r}; known: {STAGES}")
