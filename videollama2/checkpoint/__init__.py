"""Load and save VideoLLaMA2-AV checkpoints in the released layout.

Read: `model.safetensors` or sharded `model-*.safetensors` + `model.safetensors.index.json`
(also the `pytorch_model*.bin` variants the public pruning code writes), plus `audio_tower.bin`
when the shards lack the BEATs weights. The model is built on the meta device and the tensors are
assigned, so a 7B checkpoint is not initialised twice.

Save: the same key names, dtypes, files and shard assignment as the folder the model was read
from (so the output loads wherever the original does), config.json verbatim, every other
non-weight file copied (tokenizer, generation config, ...), and `audio_tower.bin` rewritten
from the current BEATs weights when the source had one. Checkpoint keys without a runtime
parameter (copies of BEATs' shared relative-position table in other layers, unknown extras) are
carried through unchanged.


Modules: `keys` (file names, runtime <-> checkpoint key names), `reading` (the weight files read lazily,
the layout), `loading` (the model and the tokenizer), `saving` (the checkpoint written again). The names
other code uses are re-exported here.
"""

from videollama2.checkpoint.loading import load_model, load_tokenizer, resolve_dtype
from videollama2.checkpoint.reading import CheckpointLayout, open_weights, optional_modules, read_weights
from videollama2.checkpoint.saving import (
    DEFAULT_SHARD_BYTES,
    checkpoint_state,
    copy_side_files,
    save_model,
    vision_tower_inside,
)

__all__ = ["CheckpointLayout", "load_model", "save_model", "read_weights", "open_weights", "load_tokenizer",
           "DEFAULT_SHARD_BYTES", "checkpoint_state", "copy_side_files", "optional_modules", "resolve_dtype",
           "vision_tower_inside"]
