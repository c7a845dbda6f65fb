"""The forward of a fused FFN's first layer, shared by the float (sparse_ffn.FusedFFNInput) and
int8 (quantized_sparse_linear.FusedQuantizedFFNInput) classes: they differ only in the layer's
own forward and in the fused op (`layer_forward`, `ffn_forward`)."""

from __future__ import annotations

import torch

from sparsekernels.ops.bsr_ffn import activate


class FusedInputForward:
    """Mixin: in training with dropout between the activation and the second layer (BART,
    T5), act(layer(x)), leaving the second layer to the model; else the whole FFN, normed by
    its kernel when nn.add_norm linked it to the post-norm after it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        state = self.__dict__["_ffn"]
        if self.training and state.dropout_p() > 0:
            return activate(self.layer_forward(x), state.activation)
        if state.add_norm is not None:  # the post-norm after it runs in the kernel
            y = state.add_norm.run(x)
            if y is not None:
                return y
        return self.ffn_forward(x)
