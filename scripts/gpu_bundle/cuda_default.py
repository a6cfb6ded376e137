"""A pytest plugin that runs the equivalence tests on a GPU: tensors and models are made there by default, matrix
products run in true float32 (no TF32), and what every row shares runs once there as on a CPU, so that the oracles
(every row whole, rows padded) check the GPU's kernels and masks. On the GPU machine, from the repository root:

    PYTHONPATH=scripts/gpu_bundle:$PYTHONPATH python3 -m pytest -p cuda_default tests/test_packing.py ...
"""

import torch


def pytest_configure(config) -> None:
    torch.set_default_device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    from softprompt_cli.model import computed_once, packing

    computed_once.ONCE_DEVICE_TYPES.add("cuda")
    packing.PACKING_MIN_SAVED_SHARE["cuda"] = packing.PACKING_MIN_SAVED_SHARE["cpu"]
    packing.SEVERAL_PROMPTS_PACKING_DEVICE_TYPES.add("cuda")
