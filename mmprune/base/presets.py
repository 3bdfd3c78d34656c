"""The methods by name: each one's layer-wise allocation, weight pruner and token rule. A table of
names only, here in the base layer because the planner (mmprune.place), the pipeline (mmprune.prune)
and the CLIs (mmprune.run) all speak it; the pipeline gives each name its meaning."""

from __future__ import annotations

# method -> (layer-wise sparsity, weight pruner, tokens in ||X|| or the Hessian); tokens "attention"
# weighs every token by the last token's attention (SparseGPT's Hessian only)
PRESETS: dict[str, tuple[str, str, str]] = {
    "magnitude": ("uniform", "magnitude", "none"),
    "wanda": ("uniform", "wanda", "all"),
    "sparsegpt": ("uniform", "sparsegpt", "all"),
    "owl": ("owl", "wanda", "all"),
    "ecoflap": ("ecoflap", "wanda", "all"),
    "das": ("das", "wanda", "all"),
    "amia": ("uniform", "wanda", "amia"),
    "tamp": ("das", "wanda", "amia"),
    "atv": ("uniform", "wanda", "atv"),
    # OBS reconstruction (SparseGPT) with TAMP's layer and token signals (docs/method.md)
    "das-sparsegpt": ("das", "sparsegpt", "all"),
    "owl-sparsegpt": ("owl", "sparsegpt", "all"),
    "ecoflap-sparsegpt": ("ecoflap", "sparsegpt", "all"),
    "amia-sparsegpt": ("uniform", "sparsegpt", "amia"),
    "attn-sparsegpt": ("uniform", "sparsegpt", "attention"),
    "tamp-obs": ("das", "sparsegpt", "amia"),
    "tamp-obs-attn": ("das", "sparsegpt", "attention"),
    "atv-obs": ("uniform", "sparsegpt", "atv"),  # ATV-Pruning's tokens in the Hessian
}
