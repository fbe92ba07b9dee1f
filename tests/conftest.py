import os

import torch

# Without a GPU, Triton kernels run in the interpreter. The variable is read when the
# kernels are decorated, so it must be set before fastres.backends.triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
