"""The custom ops' autograd, and the path eager calls take around the custom ops (ops.py, router_ops.py).

Under torch.compile a custom op is one opaque node, and its autograd is registered on it. Eager calls skip the
custom op's dispatch, whose host time (schema conversions, the autograd and backend layers, the alias check) is a
large part of a small layer's step (docs/tuning.md): they run the same forward, setup_context and backward through
a plain autograd.Function.
"""

import torch


def with_eager_path(name, op, forward, setup_context, make_backward, backward_op, backward):
    """Register the autograd of custom op `op` and return a function of its inputs that calls it under
    torch.compile, and `forward` in an autograd.Function otherwise.

    forward: the plain function `op` was made from. setup_context(ctx, inputs, output): as for register_autograd.
    make_backward(fn): the autograd backward, computed by fn, which is `backward_op` (the backward's custom op) for
    the custom op and `backward` (its plain function) for the eager path.
    """
    op.register_autograd(make_backward(backward_op), setup_context=setup_context)

    def eager_forward(ctx, *inputs):
        output = forward(*inputs)
        setup_context(ctx, inputs, output)
        return output

    eager = type(name, (torch.autograd.Function,),
                 dict(forward=staticmethod(eager_forward), backward=staticmethod(make_backward(backward))))

    def call(*inputs):
        return op(*inputs) if torch.compiler.is_compiling() else eager.apply(*inputs)

    return call
