"""What every op's registration (``<op>/op.py``) shares: the empty tensors a backward op returns
for unneeded grads, and the rule that refuses double backward through a registered op."""

from __future__ import annotations

from torch import Tensor


def empty_unless(grads, shapes, like: Tensor):
    """Each grad, or an empty tensor of its (shape, dtype) where it is None (ops cannot return None)."""
    return tuple(g if g is not None else like.new_empty(shape, dtype=dtype) for g, (shape, dtype) in zip(grads, shapes))


def no_double_backward(op: str):
    """An autograd rule for a backward op that refuses, by name, to be differentiated again."""

    def backward(ctx, *grads):
        raise RuntimeError(
            f"gift_kernels::{op}: higher-order gradients (create_graph=True, then a second backward) are not "
            f"supported through the registered ops (torch.compile's path); call gift_kernels.gift_linear eagerly, "
            f"whose backward is differentiable"
        )

    return backward


def register_no_double_backward(bwd_op, name: str) -> None:
    bwd_op.register_autograd(no_double_backward(name), setup_context=lambda ctx, inputs, output: None)
