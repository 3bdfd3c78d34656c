"""Placement of models whose LM head is tied to the input embedding (SmolLM2, Qwen2-0.5B,
Llama-3.2-1B; issue 23): the checkpoint holds that matrix once, under the embedding's name.

* Blocks, the embedding and the head on disk (a JSON map), or wherever the plan puts them under a
  --max_memory budget, prune to the plain run's checkpoint bit for bit, measure the same real-text
  perplexity (dense and pruned), and save the tie (no head tensor, a reload shares the matrix).
* The plan keeps a tied head with its embedding; a map that splits them is one `error:` line.
* `materialized` reads the shared weight once, gives both modules the same tensor and writes it
  back once; a change made through the head is what the embedding reads next. The same holds for
  a module that is not a transformers model, offloaded to a store in memory.
"""

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from fixtures_llava import build_tiny_llava_next
from fixtures_videollama2 import build_tiny_videollama2
from mmprune.base.entry import run_main
from mmprune.base.errors import UserInputError
from mmprune.place.offload import materialized, metering, offloaded_value
from script_runs import load_tensors
from videollama2.embedded import paths as av_embedded

FAST = ["--method", "tamp", "--llm_sparsity_ratio", "0.5", "--nsamples", "8", "--no_eval", "--realtext_tokens",
        "512", "--device", "cpu", "--max_shard_size", "1MB"]


def llava_main(argv):
    from llava.pruners.__main__ import main

    return main(argv)


def av_main(argv):
    from videollama2.pruners.__main__ import main

    return main(argv)


# (CLI, data flags, embedding, a JSON map with the embedding, the head and some blocks on disk, a
# budget under which the plan sends every decoder block to disk and keeps embedding and head in memory)
MODELS = {
    "llava": (llava_main, [], "model.language_model.embed_tokens",
              {"": "cpu", "model.language_model.embed_tokens": "disk", "lm_head": "disk",
               "model.language_model.norm": "disk", "model.language_model.layers.1": "disk",
               "model.language_model.layers.2": "disk"}, "cpu:1.6MiB"),
    "videollama2": (av_main, ["--data_path", str(av_embedded.DATA_PATH), "--data_folder",
                              str(av_embedded.MEDIA_FOLDER)], "model.embed_tokens",
                    {"": "cpu", "model.embed_tokens": "disk", "lm_head": "disk", "model.norm": "disk",
                     "model.layers.1": "disk", "model.audio_tower": "disk"}, "cpu:1.8MiB"),
}


@pytest.fixture(scope="module")
def tied(tmp_path_factory):
    """The tied tiny models and their plain runs (no placement)."""
    root = tmp_path_factory.mktemp("tied")
    paths = {"llava": build_tiny_llava_next(root, tie_word_embeddings=True),
             "videollama2": build_tiny_videollama2(root / "tiny-av-tied", tie_word_embeddings=True)}
    for name, path in paths.items():
        main, data = MODELS[name][:2]
        assert main(FAST + data + ["--model_path", str(path), "--save_model", str(root / f"plain-{name}")]) == 0
    return root, paths


def report_of(folder) -> dict:
    return json.loads((Path(folder) / "pruning_report.json").read_text())


def reloaded_head_and_embedding(model_name, folder):
    if model_name == "llava":
        from transformers import LlavaNextForConditionalGeneration

        model = LlavaNextForConditionalGeneration.from_pretrained(folder, dtype=torch.float32)
        return model.lm_head.weight, model.model.language_model.embed_tokens.weight
    from videollama2.model import VideoLLaMA2ForCausalLM

    model = VideoLLaMA2ForCausalLM.from_pretrained(folder)
    return model.lm_head.weight, model.model.embed_tokens.weight


@pytest.mark.parametrize("placement", ["json", "budget"])
@pytest.mark.parametrize("model", list(MODELS))
def test_tied_head_placed_prunes_saves_and_measures_like_the_plain_run(tied, tmp_path, model, placement):
    root, paths = tied
    main, data, embedding, device_map, budget = MODELS[model]
    (tmp_path / "map.json").write_text(json.dumps(device_map))
    flags = ["--device_map", str(tmp_path / "map.json")] if placement == "json" else ["--max_memory", budget]
    out = tmp_path / "placed"
    assert main(FAST + data + ["--model_path", str(paths[model]), *flags, "--offload_folder", str(tmp_path / "off"),
                               "--save_model", str(out)]) == 0

    plain = root / f"plain-{model}"
    expected, got = load_tensors(plain), load_tensors(out)
    assert expected.keys() == got.keys()
    assert not any(key.endswith("lm_head.weight") for key in got)  # the tie is saved: the matrix once
    for key in expected:
        assert torch.equal(expected[key], got[key]), f"{key} differs"
    assert sum(".layers." in k and bool((t == 0).float().mean() > 0.4) for k, t in got.items()) >= 7
    head, embed = reloaded_head_and_embedding(model, out)
    assert head is embed

    placed_report, plain_report = report_of(out), report_of(plain)
    # the same real-text perplexity, to the last bit, before and after pruning
    for phase in ("dense", "pruned"):
        assert placed_report["realtext"][phase]["perplexity"] == plain_report["realtext"][phase]["perplexity"]
        assert placed_report["realtext"][phase]["perplexity"] is not None
    where = placed_report["placement"]
    assert where["device_map"]["lm_head"] == where["device_map"][embedding]
    if placement == "json":
        assert where["device_map"]["lm_head"] == "disk"
    else:
        assert where["device_map"]["lm_head"] == "cpu" and set(where["blocks_per_device"]) == {"disk"}
    # pruned blocks were written to the run's offload folder and read back from it
    io = where["offload_io"]
    assert io["written_bytes"] == where["blocks_per_device"]["disk"] * where["plan"]["block_bytes"]
    assert io["read_bytes"]["offload_folder"] >= io["written_bytes"] > 0


def test_a_device_map_splitting_a_tie_is_one_error_line(tied, tmp_path, capsys):
    _, paths = tied
    (tmp_path / "split.json").write_text(json.dumps({"": "cpu", "lm_head": "disk"}))
    out = tmp_path / "out"
    argv = FAST + ["--model_path", str(paths["llava"]), "--device_map", str(tmp_path / "split.json"),
                   "--offload_folder", str(tmp_path / "off"), "--save_model", str(out)]
    assert run_main(llava_main, argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1].startswith("error: --device_map splits weights that are tied"), lines[-1]
    assert "lm_head on disk" in lines[-1] and "model.language_model.embed_tokens on cpu" in lines[-1]
    assert not any(line.startswith("error: ") for line in lines[:-1])
    assert not out.exists() and not (tmp_path / "off").exists()


def llava_map(embed: str, head: str) -> dict:
    """Every module of the tiny LLaVA-NeXT on the CPU but the embedding and the head, and block 0 on disk."""
    return {"model.vision_tower": "cpu", "model.multi_modal_projector": "cpu", "model.image_newline": "cpu",
            "model.language_model.embed_tokens": embed, "model.language_model.rotary_emb": "cpu",
            "model.language_model.norm": "cpu", "model.language_model.layers.0": "disk",
            "model.language_model.layers.1": "cpu", "model.language_model.layers.2": "cpu", "lm_head": head}


def test_materialized_reads_and_writes_a_tied_weight_once(tied, tmp_path):
    from llava.convert import load_llava_next

    _, paths = tied
    plain, _ = load_llava_next(paths["llava"], dtype=torch.float32)
    model, _ = load_llava_next(paths["llava"], dtype=torch.float32, device_map=llava_map("disk", "disk"),
                               offload_folder=tmp_path / "off")
    embed, head = model.model.language_model.embed_tokens, model.lm_head
    assert embed.weight.is_meta and head.weight is embed.weight  # one (offloaded) parameter again
    ids = torch.tensor([[3, 4, 5, 6, 7]])
    with torch.no_grad():  # accelerate's own hooks read the head from the embedding's entry
        torch.testing.assert_close(model(input_ids=ids).logits, plain(input_ids=ids).logits, rtol=0, atol=0)

    nbytes = embed.weight.numel() * 4
    with metering(model) as meter:
        with materialized(nn.ModuleList([embed, head]), "cpu"):
            assert head.weight is embed.weight and not head.weight.is_meta
            assert torch.equal(head.weight, plain.lm_head.weight)
            with torch.no_grad():
                head.weight[0] = 0  # a change through the head
        assert meter.read_bytes["checkpoint"] == nbytes and meter.written_bytes == nbytes  # once each
        assert head.weight.is_meta and embed.weight.is_meta
        value = offloaded_value(model, "model.language_model.embed_tokens.weight")
        assert not value[0].any() and torch.equal(value[1:], plain.lm_head.weight[1:])
        assert meter.read_bytes["offload_folder"] == nbytes  # the one file written holds both
        with materialized(embed, "cpu", keep_changes=False):
            assert not embed.weight[0].any()


def test_a_placement_that_splits_a_tie_is_refused_at_load(tied, tmp_path):
    from llava.convert import load_llava_next

    _, paths = tied
    with pytest.raises(UserInputError, match="lm_head.weight is tied to model.language_model.embed_tokens.weight"):
        load_llava_next(paths["llava"], dtype=torch.float32, device_map=llava_map("cpu", "disk"),
                        offload_folder=tmp_path / "off")


class _TiedToy(nn.Module):
    """Not a transformers model: the head is tied by assignment."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(11, 6)
        self.mid = nn.Linear(6, 6)
        self.head = nn.Linear(6, 11, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids):
        return self.head(torch.tanh(self.mid(self.embed(ids))))


def test_any_tied_module_offloaded_to_a_memory_store_holds_the_weight_once():
    from accelerate import cpu_offload

    from mmprune.place.offload import bind_tied_weights, tied_weights

    torch.manual_seed(0)
    model = _TiedToy().eval()
    ids = torch.tensor([[1, 2, 3, 10]])
    with torch.no_grad():
        expected = model(ids)
    original = model.embed.weight.detach().clone()
    ties = tied_weights(model)  # read before the hooks give each module a meta tensor of its own
    assert ties == {"head.weight": "embed.weight"}
    cpu_offload(model, execution_device="cpu")
    bind_tied_weights(model, ties)
    store = model.head._hf_hook.weights_map.dataset
    assert "head.weight" not in store.state_dict and "embed.weight" in store.state_dict
    assert model.head.weight is model.embed.weight and model.head.weight.is_meta
    with torch.no_grad():
        torch.testing.assert_close(model(ids), expected, rtol=0, atol=0)
    with materialized(nn.ModuleList([model.embed, model.head]), "cpu"):
        assert model.head.weight is model.embed.weight and not model.head.weight.is_meta
        with torch.no_grad():
            model.head.weight.mul_(2)
    for name in ("embed.weight", "head.weight"):  # one stored tensor, changed once
        assert torch.equal(offloaded_value(model, name), 2 * original)
