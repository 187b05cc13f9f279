"""Pure tensor functions that build routed experts and routers from a dense FFN (see docs: method.md).

Notation: dense FFN width F, G = granularity, E = num_experts // G (copies of the whole FFN), N = E·G routed experts,
T = top-k. Expert e holds dense shard e % G (width F/G); router row e = W_base[e // G], so the G experts of a
virtual group have bit-identical logits and top-T (T a multiple of G, stable ties) selects whole groups.

Everything random is drawn from a generator seeded by (seed, purpose, layer, expert), so a tensor can be rebuilt
on demand in any order (streaming writes rebuild an expert once per matrix) and the result is the same for a seed.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch

from ..modeling_upcycled_moe import route  # the model's router (and its stable_topk): one implementation

# ---------------------------------------------------------------------------------------------------- randomness


def generator_for(seed: int, purpose: str, layer: int = -1, expert: int = -1) -> torch.Generator:
    """An independent CPU generator per (seed, purpose, layer, expert): order-free determinism."""
    digest = hashlib.sha256(f"{seed}/{purpose}/{layer}/{expert}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


# ---------------------------------------------------------------------------------------------------- router


def router_weight(num_experts: int, granularity: int, hidden_size: int, std: float, generator) -> torch.Tensor:
    """(N, d) float32 router: W_base (E, d) ~ N(0, std²), row e = W_base[e // G] (virtual groups)."""
    base = torch.randn(num_experts // granularity, hidden_size, generator=generator, dtype=torch.float32) * std
    return base.repeat_interleave(granularity, dim=0)


@dataclass(frozen=True)
class Routing:
    """The config fields the model's `route` reads: the conversion routes before the model config exists."""

    router_type: str
    num_experts_per_tok: int
    norm_topk_prob: bool = False

    @property
    def weights_sum_to_one(self) -> bool:
        """topk_softmax, and any router with norm_topk_prob, renormalise the kept weights: Σ_selected w = 1."""
        return self.router_type == "topk_softmax" or bool(self.norm_topk_prob)


def routing_weights(logits: torch.Tensor, router: str, top_k: int, norm_topk_prob: bool = False):
    """(T, N) logits → (top-k weights, top-k indices), computed by the model's own router (one implementation)."""
    _, weights, index = route(logits.float(), Routing(router, top_k, norm_topk_prob))
    return weights, index


def selected_mass(logits: torch.Tensor, router: str, top_k: int, norm_topk_prob: bool = False) -> torch.Tensor:
    """Per token, the total routing weight given to the selected experts (1 for topk_softmax or norm_topk_prob)."""
    return routing_weights(logits, router, top_k, norm_topk_prob)[0].sum(dim=-1)


ROUTING_FIELDS = ("router_type", "num_experts_per_tok", "norm_topk_prob")


def routing_changes(config, overrides: dict) -> list[str]:
    """The keys of `overrides` that change how a converted model weighs its experts.

    The experts were scaled for the routing the model was converted with; any other routing makes the model start
    away from the dense one (e.g. norm_topk_prob on a softmax_topk conversion: max |Δlogit| 0.077 on a tiny Llama).
    norm_topk_prob on topk_softmax changes nothing, so it is not reported.
    """
    def routing(values):
        r = Routing(values["router_type"], values["num_experts_per_tok"], values["norm_topk_prob"])
        return r.router_type, r.num_experts_per_tok, r.weights_sum_to_one

    before = {k: getattr(config, k) for k in ROUTING_FIELDS}
    changed = []
    for key in ROUTING_FIELDS:
        if key in overrides and routing({**before, key: overrides[key]}) != routing(before):
            changed.append(key)
    return changed


# ---------------------------------------------------------------------------------------------------- scaling


def activation_scale(router: str, num_experts: int, top_k: int, granularity: int, norm_topk_prob: bool = False) -> float:
    """The factor s the expert outputs need so that the MoE starts at the dense output (at init, in expectation).

    The G experts of a selected virtual group sum to the dense FFN, so the layer outputs (Σ_selected w) / G · dense.
    - topk_softmax, or any router with norm_topk_prob: Σ w = 1 exactly → s = G (exact for any router).
    - softmax_topk: p ≈ 1/N, Σ w ≈ T/N                                 → s = N·G/T = E·G²/T (near-exact, small router).
    - sigmoid_topk: sigmoid(logit ≈ 0) ≈ 1/2, Σ w ≈ T/2                → s = 2G/T (same approximation).
    """
    if router not in ("topk_softmax", "softmax_topk", "sigmoid_topk"):
        raise ValueError(f"unknown router {router!r}")
    if Routing(router, top_k, norm_topk_prob).weights_sum_to_one:
        return float(granularity)
    if router == "softmax_topk":
        return num_experts * granularity / top_k
    return 2.0 * granularity / top_k


def calibrated_scale(mean_selected_mass: float, granularity: int) -> float:
    """s that makes the mean gain s · E[Σ_selected w] / G equal to 1 on real activations."""
    return granularity / mean_selected_mass


@dataclass(frozen=True)
class Multipliers:
    """What each expert matrix is multiplied by (gate is unused for plain MLPs)."""

    gate: float = 1.0
    up: float = 1.0
    down: float = 1.0


def place_scale(s: float, placement: str, gated: bool, hidden_act: str) -> Multipliers:
    """Where the factor s goes.

    - "exact" (and "calibrated"): function-preserving for the architecture. Gated MLP: gate untouched, up and down
      × sqrt(s) (the output is linear in up and in down). Plain MLP: relu2 is homogeneous of degree 2, so up and down
      × s^(1/3) gives s exactly; relu (degree 1) takes sqrt(s) on each; any other activation takes all of s on down.
    - "paper": s^(1/3) on every expert matrix (Megatron-LM); exact for relu2, not for SwiGLU (by design).
    - "none": nothing.
    """
    if placement == "none" or s == 1.0:
        return Multipliers()
    if placement == "paper":
        c = s ** (1.0 / 3.0)
        return Multipliers(gate=c if gated else 1.0, up=c, down=c)
    if placement not in ("exact", "calibrated"):
        raise ValueError(f"unknown scaling {placement!r}")
    if gated:
        r = math.sqrt(s)
        return Multipliers(up=r, down=r)
    act = hidden_act.lower()
    if act in ("relu2", "relu_squared", "squared_relu"):
        c = s ** (1.0 / 3.0)
        return Multipliers(up=c, down=c)
    if act == "relu":
        r = math.sqrt(s)
        return Multipliers(up=r, down=r)
    return Multipliers(down=s)


# ---------------------------------------------------------------------------------------------------- experts


def shard_slice(expert: int, granularity: int, width: int) -> slice:
    """Rows [jF/G, (j+1)F/G) of the dense intermediate dimension, j = expert % G."""
    size = width // granularity
    j = expert % granularity
    return slice(j * size, (j + 1) * size)


def drop_upcycle(gate, up, down, ratio: float, generator):
    """Drop-Upcycling: permute the expert's neurons (function-preserving), then re-draw floor(ratio·width) of them.

    The re-drawn rows of gate/up and columns of down come from N(mean, std²) of the weights they replace, per
    matrix. ratio = 0 returns the inputs untouched (plain upcycling, bit-identical copies).
    gate may be None (plain MLP). Shapes: gate/up (I, d), down (d, I).
    """
    width = up.shape[0]
    count = math.floor(ratio * width)
    if count == 0:
        return gate, up, down
    # After a uniformly random permutation, positions [0, count) are a uniformly random subset of the neurons.
    perm = torch.randperm(width, generator=generator)

    def redraw_rows(weight, dim):
        weight = weight.index_select(dim, perm).clone()
        block = weight.narrow(dim, 0, count)
        mean = block.mean().item()
        std = block.std().item() if block.numel() > 1 else 0.0
        fresh = torch.randn(block.shape, generator=generator, dtype=torch.float32) * std + mean
        block.copy_(fresh.to(weight.dtype))
        return weight

    gate = redraw_rows(gate, 0) if gate is not None else None
    up = redraw_rows(up, 0)
    down = redraw_rows(down, 1)
    return gate, up, down


def add_noise(weight: torch.Tensor, std: float, fraction: float, generator) -> torch.Tensor:
    """Noise upcycling: add N(0, std²) to a random `fraction` of the entries."""
    if std == 0.0 or fraction == 0.0:
        return weight
    noise = torch.randn(weight.shape, generator=generator, dtype=torch.float32) * std
    if fraction < 1.0:
        noise = noise * (torch.rand(weight.shape, generator=generator) < fraction)
    return weight + noise.to(weight.dtype)


@dataclass(frozen=True)
class ExpertRecipe:
    """Everything that turns a dense FFN into routed expert e (except the per-expert randomness)."""

    granularity: int
    multipliers: Multipliers
    drop_ratio: float = 0.0
    noise_std: float = 0.0
    noise_fraction: float = 1.0
    seed: int = 0

    @property
    def per_expert(self) -> bool:
        """Whether experts built from the same dense rows differ (they draw their own randomness)."""
        return self.drop_ratio > 0 or self.noise_std > 0


def build_expert(gate, up, down, expert: int, layer: int, recipe: ExpertRecipe, rows: slice | None = None):
    """Routed expert `expert` of `layer` from the dense FFN matrices (float32; gate None for plain MLPs).

    Order: take the shard (`rows`, by default shard expert % G) → Drop-Upcycling → noise → scaling (the redraw
    statistics are those of the dense shard).
    """
    if rows is None:
        rows = shard_slice(expert, recipe.granularity, up.shape[0])
    gate = gate[rows] if gate is not None else None
    up, down = up[rows], down[:, rows]
    if recipe.drop_ratio > 0:
        gate, up, down = drop_upcycle(gate, up, down, recipe.drop_ratio, generator_for(recipe.seed, "drop", layer, expert))
    if recipe.noise_std > 0:
        g = generator_for(recipe.seed, "noise", layer, expert)
        gate = add_noise(gate, recipe.noise_std, recipe.noise_fraction, g) if gate is not None else None
        up = add_noise(up, recipe.noise_std, recipe.noise_fraction, g)
        down = add_noise(down, recipe.noise_std, recipe.noise_fraction, g)
    m = recipe.multipliers
    if gate is not None and m.gate != 1.0:
        gate = gate * m.gate
    if m.up != 1.0:
        up = up * m.up
    if m.down != 1.0:
        down = down * m.down
    return gate, up, down
