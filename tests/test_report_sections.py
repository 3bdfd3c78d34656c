from mmprune.report import update_markdown_section


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
