from mmprune.run.report import update_markdown_section


def test_sections_are_replaced_in_place_and_others_kept(tmp_path):
    path = str(tmp_path / "results.md")
    update_markdown_section(path, "weights", "table 1", title="# Results")
    update_markdown_section(path, "tokens", "table 2")
    update_markdown_section(path, "weights", "table 1, rerun\nsecond line")
    text = open(path).read()
    assert text.startswith("# Results\n")
    assert "table 1, rerun\nsecond line" in text and "table 1\n" not in text
    assert text.index("table 1, rerun") < text.index("table 2")
    assert text.count("<!-- section:weights -->") == 1
    assert not (tmp_path / "results.md.tmp").exists()


def _eas_rows(fold_s: float) -> list:
    def row(name, prefill, decoder, skipped=None):
        return {"name": name, "skipped": skipped, "accuracy": 0.9, "answer_perplexity": 1.1, "n": 300,
                "prefill_s": prefill, "decoder_s": decoder, "speedup": 0.4 / prefill, "decoder_speedup": 0.2 / decoder,
                "train_minutes": None, "probs": None}
    return [row("dense", 0.4, 0.2), row("TAMP 0.5", 0.4, 0.2), row("dense + EAS K=0.25", 0.38, 0.18, "3"),
            row("dense + EAS K=0.5", 0.36, 0.17, "1, 3"),
            row("dense + EAS K=0.5, PIA folded into the FFN", fold_s, 0.19, "1, 3")]


def test_eas_section_renders_from_saved_results_and_states_what_was_measured(tmp_path):
    import json

    from llava.eas import results

    meta = {"command": "python -m llava.eas.results", "minutes": 20.0, "reuse": False, "dense_sha1": "abc",
            "train_args": "", "eval_n": 300, "repeats": 7, "n_prompts": 48, "cores": 2,
            "load_average_1min": [1.2, 2.4], "attn_macs": 61144, "ffn_macs": 147456, "prompt_len": 93.0,
            "layers": 4, "hidden": 128, "skipped_k2": 2, "share_k2": 0.15, "section": "eas-tiny", "clock": "cpu",
            "title": "the tiny embedded LLaVA-NeXT (4-layer decoder trained from scratch)", "speedup_k2": 1.11, "decoder_speedup_k2": 1.18,
            "speedup_tamp": 1.0, "decoder_speedup_tamp": 1.0}
    md = tmp_path / "results.md"
    for fold_s, phrase in ((0.41, "adds more at prefill than it saves"), (0.35, "saves a little more at prefill")):
        saved = tmp_path / "eas_results.json"
        saved.write_text(json.dumps({"rows": _eas_rows(fold_s), "meta": meta}))
        assert results.main(["--render", str(saved), "--results", str(md)]) == 0
        text = md.read_text()
        assert "2 cores, 1-minute load average 1.2 at the start, 2.4 at the end" in text
        assert "<!-- section:eas-tiny -->\n## EAS: attention skipping with PIA adapters on the tiny embedded" in text
        assert "skipping 2 of 4 attention blocks removes about 15%" in text and "CPU time of the thread" in text
        assert "4 blocks (d 128), so K=0.25 skips 1 and K=0.5 skips 2" in text
        assert "At d = 128 a batch-1 CPU prefill is bound by per-operation overhead" in text
        assert phrase in text and "shared" not in text
        assert "gain still reaches the MAC share" in text  # 1 - 1/1.18 = 15.3 % >= the 15 % share
    saved.write_text(json.dumps({"rows": _eas_rows(0.41), "meta": dict(meta, decoder_speedup_k2=1.05)}))
    results.main(["--render", str(saved), "--results", str(md)])
    assert "gain stays below the MAC share" in md.read_text()
