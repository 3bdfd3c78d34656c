import pytest

from mmprune.base.errors import UserInputError
from mmprune.prune.sparsity_dict import read_sparsity_dict, write_sparsity_dict


def test_round_trip_exact_and_across_name_layouts(tmp_path):
    names = [f"model.language_model.layers.{i}.mlp.{p}" for i in range(3) for p in ("up_proj", "down_proj")]
    values = {n: 0.5 + 0.0123456789 * k for k, n in enumerate(names)}
    path = tmp_path / "sparsity_dict.yaml"
    write_sparsity_dict(str(path), values)
    assert read_sparsity_dict(str(path), names) == values
    legacy = [n.replace("model.language_model.", "language_model.model.") for n in names]
    assert list(read_sparsity_dict(str(path), legacy).values()) == list(values.values())


def test_missing_entry_and_bad_value_are_errors(tmp_path):
    path = tmp_path / "d.yaml"
    path.write_text("layers.0.mlp.up_proj.weight: 0.5\n")
    with pytest.raises(UserInputError, match="no entry"):
        read_sparsity_dict(str(path), ["layers.0.mlp.up_proj", "layers.0.mlp.down_proj"])
    path.write_text("layers.0.mlp.up_proj.weight: 1.5\n")
    with pytest.raises(UserInputError, match="outside"):
        read_sparsity_dict(str(path), ["layers.0.mlp.up_proj"])
    with pytest.raises(UserInputError, match="no such file"):
        read_sparsity_dict(str(tmp_path / "nope.yaml"), ["x"])
