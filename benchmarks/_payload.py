"""Size of a collective's payload (a tensor or a list of them), shared by the ZeRO benchmark workers."""
import torch


def nbytes(x) -> int:
    if isinstance(x, torch.Tensor):
        return x.numel() * x.element_size()
    if isinstance(x, (list, tuple)):
        return sum(nbytes(v) for v in x)
    return 0
