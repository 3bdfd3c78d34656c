"""Convert an original lmms-lab LLaVA-NeXT checkpoint to the llava-hf layout, and load either.

The TAMP paper prunes `lmms-lab/llama3-llava-next-8b`, saved by the original LLaVA-NeXT code:
a Llama config with `mm_*` fields (model_type "llava_llama"), keys `model.layers.*`,
`model.mm_projector.{0,2}.*`, `model.vision_tower.vision_tower.vision_model.*`,
`model.image_newline`, `lm_head.weight`, a 128256-token Llama-3-Instruct tokenizer and anyres
pinpoints written as (width, height). The pruner works on `LlavaNextForConditionalGeneration`
(llava-hf layout), so this package writes such a directory:

* config: `LlavaNextConfig` with the Llama fields of the source as text config; the CLIP
  ViT-L/14-336 numbers as vision config unless the source carries one (a `vision_config` entry in
  config.json, or `mm_vision_tower` naming a local directory with a config.json); pinpoints turned
  to (height, width); `vision_feature_layer` = `mm_vision_select_layer`;
* weights: renamed to the llava-hf on-disk names (docs/models.md 1.9), streamed shard by shard
  into sharded safetensors, optionally cast;
* tokenizer: `<image>` and `<pad>` added as special tokens; embeddings and lm_head grown to a
  multiple of 64 rows. The new rows are the **mean of the existing rows** (deterministic). The
  transformers converter script (`convert_llava_next_weights_to_hf.py`) instead samples them from
  a normal distribution around that mean, so those rows differ from llava-hf's release; they are
  never used for text (the `<image>` rows are replaced by image features before the decoder);
* processor: `LlavaNextProcessor` (patch size from the vision config, strategy "default",
  `num_additional_image_tokens=1`), the PIL LLaVA-NeXT image processor with CLIP-336
  preprocessing, and a Llama-3 chat template for llava-hf as the processor chat template.

CLI: ``python -m llava.convert --src DIR --dst DIR [--dtype bfloat16]``.

Modules: `configs` (config.json: layout detection, the llava-hf text and vision configs, the
tokenizer's llava tokens, the chat template), `weights` (the source's weight files read lazily,
the key map, the sharded writer), `conversion` (the converter and the cached conversion on load),
`loading` (llava-hf model and processor loaders) and `cli` (`python -m llava.convert`). The names
other code uses are re-exported here.
"""

from llava.convert.cli import main
from llava.convert.configs import LLAMA3_LLAVA_CHAT_TEMPLATE, is_llava_hf_checkpoint, is_lmms_lab_checkpoint
from llava.convert.conversion import CONVERTER_COMMAND, PROVENANCE_FILE, convert_lmms_lab_to_hf
from llava.convert.loading import (
    check_processor_files,
    load_llava_next,
    load_model,
    load_pretrained_checked,
    load_processor,
)
from llava.convert.weights import parse_dtype

__all__ = [
    "CONVERTER_COMMAND",
    "LLAMA3_LLAVA_CHAT_TEMPLATE",
    "PROVENANCE_FILE",
    "check_processor_files",
    "convert_lmms_lab_to_hf",
    "is_llava_hf_checkpoint",
    "is_lmms_lab_checkpoint",
    "load_llava_next",
    "load_model",
    "load_pretrained_checked",
    "load_processor",
    "main",
    "parse_dtype",
]
