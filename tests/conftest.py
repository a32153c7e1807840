import os

# Triton chooses interpreted or compiled code when a kernel is decorated (@triton.jit), so this must
# run before anything imports triton: without a CUDA device, the kernel tests run the Triton code
# itself under the interpreter (TRITON_INTERPRET=1) on CPU tensors. An explicit setting wins.
if "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"
