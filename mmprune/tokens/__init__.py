"""Visual-token pruning at inference (FitPrune): recipes searched from calibration attention, applied by hooks.
May import mmprune.base and mmprune.prune.

Modules, each importing only those before it: `recipe` (TokenRecipe and its JSON file), `flops` (the
decoder's FLOPs model), `scores` (attention statistics, drop rules), `dropping` (one decoder layer run with
a drop step), `hooks` (apply_token_recipe at inference), `search` (the recipe search). docs/fitprune.md.
"""
