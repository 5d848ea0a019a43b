"""Let PyPI's torchvision wheel import on a CPU-only torch (installed by ``install.sh --vlm``).

PyPI's Linux torchvision wheels are CUDA builds: their operator library links against torch's
CUDA libraries, so on a CPU torch it cannot load, and torchvision's import then fails while
registering fake kernels for two of those operators ("operator torchvision::nms does not
exist"). What transformers needs of torchvision here, the image and video transforms of the
Qwen-VL and LLaVA-OneVision processors, is pure Python over torch and works on the CPU. Just
before torchvision is first imported, this hook declares the two operators' schemas so that the
import goes through. They get no kernel: calling them, or any other torchvision operator, still
fails with torchvision's own "not compiled" error. With a CUDA or ROCm torch it does nothing.
"""

import importlib.abc
import sys

_declared = []  # the torch.library.Library holding the schemas must stay alive


class _DeclareTorchvisionOperators(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != "torchvision":
            return None
        sys.meta_path.remove(self)
        import torch

        if torch.version.cuda is None and torch.version.hip is None:
            library = torch.library.Library("torchvision", "DEF")
            for operator in ("nms", "qnms"):
                library.define(f"{operator}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
            _declared.append(library)
        return None  # the regular finders import torchvision itself


sys.meta_path.insert(0, _DeclareTorchvisionOperators())
