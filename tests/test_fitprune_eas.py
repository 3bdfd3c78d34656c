"""FitPrune on a model whose attention is skipped in some layers (EAS): the search never drops
tokens at a skipped layer, and the recipe applies to that model in evaluation."""

import pytest
import torch
from transformers import AutoProcessor, LlavaNextForConditionalGeneration

from llava import data, eas as llava_eas, eval as llava_eval
from llava import fitprune as lfp
from llava.embedded import paths


@pytest.fixture(scope="module")
def eas_model():
    model = LlavaNextForConditionalGeneration.from_pretrained(paths.CHECKPOINT_DIR, dtype=torch.float32)
    processor = AutoProcessor.from_pretrained(paths.CHECKPOINT_DIR)
    torch.manual_seed(0)
    llava_eas.install(model, skipped=[2], rank=4, dropout=0.0)  # fresh adapter: behaviour, not accuracy
    return model.eval(), processor


def test_search_on_an_eas_model_drops_nothing_at_the_skipped_layer(eas_model):
    model, processor = eas_model
    calibration = data.select_task(data.load_records(paths.DATA_PATH), paths.TASK_SPLIT_PATH,
                                   paths.CALIBRATION_TASK, 6, seed=0)
    recipe = lfp.search(model, processor, calibration, paths.IMAGE_FOLDER, budget=0.5, progress=False)
    keep = recipe.keep_fraction
    assert len(keep) == 4
    assert keep[2] == keep[1]  # layer 2 has no attention, so it cannot score (or drop) tokens
    assert keep[-1] < 1.0
    records = data.load_records(paths.EVAL_DATA_PATH)[:3]
    result = llava_eval.evaluate(model, processor, records, paths.EVAL_IMAGE_FOLDER, progress=False,
                                 token_recipe=recipe)
    assert result["n"] == 3 and result["answer_perplexity"] is not None


def test_a_recipe_dropping_at_a_skipped_layer_is_refused(eas_model):
    model, processor = eas_model
    from mmprune.tokens.recipe import TokenRecipe
    from mmprune.base.errors import UserInputError

    with pytest.raises(UserInputError, match="decoder layer 2"):
        lfp.apply_token_recipe(model, TokenRecipe([1.0, 1.0, 0.5, 0.5]))
