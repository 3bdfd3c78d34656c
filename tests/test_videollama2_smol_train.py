"""The SmolLM2 VideoLLaMA2-AV trainer (videollama2/embedded/train_smol.py) on a toy decoder (seconds):
what it writes assembles into the model it scored, the probes of the hard task, LoRA options."""

import copy
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

from mmprune.embedded import smollm2
from mmprune.base.errors import UserInputError
from videollama2.embedded import smol, synthetic_av as av, tiny, train, train_smol
from videollama2.eval import evaluate
from videollama2.media import MediaLoader


def toy_decoder(vocab_size, seed=0):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=512,
                         rms_norm_eps=1e-5, tie_word_embeddings=True,
                         rope_parameters={"rope_type": "default", "rope_theta": 100000.0})
    return LlamaForCausalLM(config).eval()


def quick_args(out, *extra):
    return train_smol.parse_args(["--out", str(out), "--minutes", "5", "--pool", "3", "--val-clips", "2",
                                  "--encoder-steps", "2", "--align-steps", "2", "--steps", "2", "--batch-size", "2", "--eval-every", "2",
                                  "--no-heldout", "--threads", "1", "--seed", "5", *extra])


def test_hard_probes_use_the_steps_that_show_one_shape():
    model, _ = tiny.build(0)
    aux = train.auxiliary_heads(model, "hard")
    # 8 sampled frames 1,3,5,7,8,10,12,14 in pairs; slots of frames 0-5, 6-10, 11-15
    assert aux.step_slots == [(0, 0), (2, 1), (3, 2)]
    specs = [av.draw_spec(s, "hard") for s in range(3)]
    width = model.config.text_config().hidden_size
    video = torch.randn(3, model.video_token_count(), width, requires_grad=True)
    audio = torch.randn(3, model.audio_token_count(), width)
    loss = aux.loss(video, audio, specs)
    loss.backward()
    assert loss.item() > 0 and video.grad[:, 16:32].abs().sum() == 0  # the mixed step 1 is not probed
    assert isinstance(train.auxiliary_heads(model), train.AuxiliaryHeads)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A run with LoRA; its validation clips are kept (x264 does not rewrite them byte for byte)."""
    tokenizer = tiny.build_tokenizer("hard")
    decoder = toy_decoder(len(tokenizer))
    out = tmp_path_factory.mktemp("run") / "parts"
    kept_folder, kept = tmp_path_factory.mktemp("val"), []

    def keep(folder, clips, variant):
        records = write_validation(folder, clips, variant)
        for record in records:
            shutil.copyfile(folder / record["video"], kept_folder / record["video"])
        kept.extend(records)
        return records

    write_validation = train_smol.write_validation
    args = quick_args(out, "--lora-rank", "2", "--lora-layers", "1", "--lora-targets", "q_proj,down_proj")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train_smol, "write_validation", keep)
        info = train_smol.train(args, copy.deepcopy(decoder), copy.deepcopy(tokenizer))
    return out, info, decoder, tokenizer, (kept, kept_folder)


def test_trainer_writes_a_parts_folder_that_assembles_into_the_scored_model(trained):
    out, info, decoder, tokenizer, (records, folder) = trained
    names = {p.name for p in out.iterdir()}
    assert {smol.PARTS_CONFIG, smol.PARTS_TENSORS, smol.TRAINING_INFO, smollm2.ADAPTER_CONFIG,
            smollm2.ADAPTER_TENSORS} <= names
    assert not any(n.startswith(".") and n != ".mmprune-output" for n in names)
    parts, tensors, deltas = smol.read_parts(out)
    assert parts["trained"] is True and parts["task"] == "hard"
    assert sorted(deltas) == ["model.layers.1.mlp.down_proj.weight", "model.layers.1.self_attn.q_proj.weight"]
    recorded = json.loads((out / smol.TRAINING_INFO).read_text())
    assert recorded["stage1_probes"]["steps"] == 2 and recorded["stage2_frozen_decoder"]["steps"] == 2
    assert recorded["stage1b_soft_words"]["steps"] == 2
    assert recorded["stage3_lora"]["steps"] == 2 and recorded["lora"]["layers"] == [1]
    assert {h["stage"] for h in recorded["history"]} == {"stage 2 (frozen decoder)", "stage 3 (LoRA)"}
    # the parts moved away from their initialisation
    fresh = smol.fresh_parts(smol.default_parts_config("hard"), 48, 5)
    assert any(not torch.equal(tensors[k], smol.stored_parts(fresh)[k]) for k in fresh)
    # what assembly builds from the folder scores exactly what the trainer recorded
    model = smol.build_model(decoder, smol.build_tokenizer(copy.deepcopy(tokenizer)), parts, tensors, deltas)
    result = evaluate(model, smol.build_tokenizer(copy.deepcopy(tokenizer)), records, folder,
                      MediaLoader.for_config(model.config, model.image_size), progress=False)
    assert result == info["validation"]
    assert set(result["per_kind"]) == set(av.KINDS)
    # the decoder itself was not trained: every non-LoRA decoder weight is the input's
    state = model.state_dict()
    for name, tensor in decoder.state_dict().items():
        if name != "lm_head.weight" and name not in deltas:
            assert torch.equal(state[name], tensor), name


def test_trainer_without_lora_writes_no_adapter(tmp_path):
    tokenizer = tiny.build_tokenizer("hard")
    out = tmp_path / "parts"
    info = train_smol.train(quick_args(out, "--encoder-steps", "0", "--variant", "basic"), toy_decoder(len(tokenizer)),
                            tokenizer)
    assert not (out / smollm2.ADAPTER_CONFIG).exists()
    assert info["stage3_lora"] is None and info["data"]["variant"] == "basic"
    assert smol.read_parts(out)[0]["task"] == "basic"


def test_lora_options_are_checked():
    tokenizer = tiny.build_tokenizer("hard")
    model = smol.build_model(toy_decoder(len(tokenizer)), smol.build_tokenizer(tokenizer),
                             smol.default_parts_config(), smol.fresh_parts(smol.default_parts_config(), 48))
    args = quick_args("unused", "--lora-rank", "2", "--lora-layers", "0-5")
    with pytest.raises(UserInputError, match="layers run from 0 to 1"):
        train_smol.lora_config(model, args)
    args = quick_args("unused", "--lora-rank", "2", "--lora-layers", "1", "--lora-targets", "q_proj,wq")
    with pytest.raises(UserInputError, match="unknown"):
        train_smol.lora_config(model, args)
    config = train_smol.lora_config(model, quick_args("unused", "--lora-rank", "2", "--lora-layers", "1"))
    assert len(config["target_modules"]) == 7 and config["lora_alpha"] == 4


def test_foreign_out_folder_is_refused_before_training(tmp_path, capsys):
    out = tmp_path / "parts"
    out.mkdir()
    (out / "notes.txt").write_text("keep")
    assert train_smol.main(["--out", str(out), "--minutes", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and (out / "notes.txt").exists()


def test_training_script_settings_parse_and_keep_the_55_minute_budget():
    import shlex

    from videollama2.embedded import paths

    script = (paths.REPO_ROOT / "scripts_videollama2" / "embedded" / "train_videollama2_av_smol.sh").read_text()
    joined = script.replace("\\\n", " ")
    command = shlex.split(joined.split('"$PY" -m videollama2.embedded.train_smol', 1)[1].split("\n")[0])
    assert command[-1] == "$@"
    args = train_smol.parse_args(command[:-1])
    assert args.minutes == 55 and args.variant == "hard" and args.out == smol.PARTS_DIR.relative_to(paths.REPO_ROOT)
    # the committed parts' recipe: no stage 2, a cached LoRA on layers 14-29, 8 questions per conversation
    assert args.stage3_share == 1 and args.lora_rank == 16 and args.cached and args.turns == 8
    info = json.loads((paths.SMOL_PARTS_DIR / smol.TRAINING_INFO).read_text())
    assert {k: v for k, v in info["settings"].items() if k != "init_adapter"} == \
        {k: v for k, v in vars(args).items() if k not in ("out", "cache_dir", "wheel", "init_adapter")}


def test_multi_turn_conversations_label_every_answer_and_never_repeat_a_question():
    import random

    from videollama2.model import IGNORE_INDEX

    tokenizer = smol.build_tokenizer(tiny.build_tokenizer("hard"))
    prompts = train.Prompts(tokenizer)
    rng = random.Random(0)
    for seed in range(30):
        spec = av.draw_spec(seed, "hard")
        turns = train.draw_turns(rng, spec, 4)
        assert 1 <= len(turns) <= 4 and len({q for q, _ in turns}) == len(turns)
        ids, labels = prompts.encode_turns(turns)
        assert ids.count(-201) == 1  # one <video> placeholder, in the first question
        labelled = tokenizer.decode([t for t in labels if t != IGNORE_INDEX]).split()
        assert labelled == [w for _, answer in turns for w in (answer, "<|im_end|>")]  # each answer and its end


def test_lora_layer_spec_that_is_not_a_number_is_a_user_error():
    with pytest.raises(UserInputError, match="lora-layers"):
        train_smol.layer_indices("top", 30)
    assert train_smol.layer_indices("all", 3) == [0, 1, 2]


def test_cached_top_layers_give_the_full_answer_loss():
    import random

    tokenizer = smol.build_tokenizer(tiny.build_tokenizer("hard"))
    parts = smol.default_parts_config()
    model = smol.build_model(toy_decoder(len(tokenizer)), tokenizer, parts, smol.fresh_parts(parts, 48, 1))
    prompts = train.Prompts(tokenizer)
    rng = random.Random(0)
    conversations = []
    for seed in range(3):  # different lengths: the padded batch must not change the loss
        spec, frames, audio = av.make_clip(seed, "hard")
        ids, labels = prompts.encode_turns(train.draw_turns(rng, spec, 1 + seed))
        conversations.append({"input_ids": torch.tensor([ids]), "labels": torch.tensor([labels]),
                              "video": frames[::2], "audio": torch.randn(model.audio_frame_count(), 128)})
    from videollama2.data import collate
    from videollama2.media import normalize_frames

    encoded = [{"input_ids": c["input_ids"], "labels": c["labels"], "video": normalize_frames(c["video"]).unsqueeze(0),
                "audio": c["audio"].unsqueeze(0)} for c in conversations]
    batch = collate(encoded, tokenizer.pad_token_id)
    with torch.no_grad():
        whole = model.lm_loss(batch["input_ids"], batch["attention_mask"], batch["labels"],
                              model.encode_video(batch["video"]), model.encode_audio(batch["audio"]), labelled_only=True)
        items = train_smol.hidden_entering(model, 1, batch, bf16=False)
        top = train_smol.top_answer_loss(model, 1, items)
    assert [len(h) for h, _ in items] == [int(n) for n in model.embed_inputs(
        batch["input_ids"], batch["attention_mask"], batch["labels"], batch["video"], batch["audio"]).attention_mask.sum(1)]
    torch.testing.assert_close(top, whole, rtol=1e-5, atol=1e-5)


def test_cached_lora_run_writes_an_adapter(tmp_path):
    tokenizer = tiny.build_tokenizer("hard")
    out = tmp_path / "parts"
    info = train_smol.train(quick_args(out, "--lora-rank", "2", "--lora-layers", "1", "--cached", "--cached-pool", "2",
                                       "--turns", "2"), toy_decoder(len(tokenizer)), tokenizer)
    assert info["stage3_lora"]["cached_from_layer"] == 1 and info["stage3_lora"]["steps"] == 2
    assert info["stage3_lora"]["conversations_cached"] >= 2
    assert all(t.dtype == torch.float16 for t in load_file(out / smollm2.ADAPTER_TENSORS).values())  # as the parts
    assert any(h["stage"] == "stage 3 (LoRA, cached)" for h in info["history"])


def test_soft_word_targets_name_what_each_media_token_carries(tmp_path):
    import random

    from llava.embedded.train_smol_targets import word_vector

    tokenizer = smol.build_tokenizer(tiny.build_tokenizer("hard"))
    parts = smol.default_parts_config()
    model = smol.build_model(toy_decoder(len(tokenizer)), tokenizer, parts, smol.fresh_parts(parts, 48, 1))
    soft = train_smol.SoftWords(model, tokenizer)
    embeddings = model.model.embed_tokens.weight.detach()

    def word(w):
        return word_vector(embeddings, tokenizer, w)

    spec = av.draw_spec(3, "hard")
    video = soft.video_targets([spec])[0]
    assert video.shape == (model.video_token_count(), 48)
    first, second = spec.shapes[0], spec.shapes[1]
    torch.testing.assert_close(video[0], word(first.color) + word(first.shape))
    torch.testing.assert_close(video[15], video[0])  # every token of the step
    # step 1 holds sampled frames 5 (first shape) and 7 (second shape)
    torch.testing.assert_close(video[16], (word(first.color) + word(first.shape) + word(second.color)
                                           + word(second.shape)) / 2)
    audio = soft.audio_targets([spec])[0]
    assert audio.shape == (model.audio_token_count(), 48)
    heard = soft.audio_times  # (time patches, frames) in original seconds, increasing
    assert bool((heard[1:, 0] > heard[:-1, 0]).all()) and float(heard.max()) < av.SECONDS
    for p in range(len(heard)):
        playing = [s for s in spec.sounds if ((heard[p] >= s.start) & (heard[p] < s.start + s.length)).any()]
        assert bool(audio[p * soft.bins].any()) == bool(playing), p

    # a few steps of stage 1b bring the projected tokens closer to their soft words
    out = tmp_path / "clips"
    out.mkdir()
    pool = train.ClipPool(model, out, 0, "hard")
    pool.fill(3)
    args = quick_args("unused", "--align-steps", "12", "--align-lr", "3e-3")
    result = train_smol.align_projectors(model, soft, pool, random.Random(0), args, deadline=float("inf"))
    assert result["steps"] == 12 and result["final_mse"] < result["first_mse"]


def test_a_finished_run_goes_on_from_its_parts_and_adapter(trained, tmp_path):
    first, _, decoder, tokenizer, _ = trained
    out = tmp_path / "more"
    args = quick_args(out, "--init-parts", str(first), "--init-adapter", str(first), "--lora-rank", "2",
                      "--lora-layers", "1", "--lora-targets", "q_proj,down_proj", "--stage3-share", "1",
                      "--encoder-steps", "0", "--align-steps", "0", "--lora-lr", "0", "--lr", "0")
    info = train_smol.train(args, copy.deepcopy(decoder), copy.deepcopy(tokenizer))
    assert info["stage2_frozen_decoder"]["steps"] == 0 and info["stage3_lora"]["steps"] > 0
    # at learning rate 0 the adapter and the parts come out as they went in
    before, after = load_file(first / smollm2.ADAPTER_TENSORS), load_file(out / smollm2.ADAPTER_TENSORS)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    parts_before, parts_after = load_file(first / smol.PARTS_TENSORS), load_file(out / smol.PARTS_TENSORS)
    assert all(torch.equal(parts_before[k], parts_after[k]) for k in parts_before)
    with pytest.raises(SystemExit):
        train_smol.parse_args(["--init-adapter", str(first)])  # no --lora-rank
