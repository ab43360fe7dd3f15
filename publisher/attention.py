"""Neural Engine attention: Apple's ``split_einsum`` layouts as module swaps on diffusers models.

Apple's ml-stable-diffusion runs the UNet's transformers on the Neural Engine by keeping every
tensor channels-first and 4-D, (B, C, 1, S), using 1x1 convolutions where diffusers uses linear
layers, normalizing over the channel axis, and computing attention one head at a time with
einsums the Neural Engine maps well (https://machinelearning.apple.com/research/neural-engine-transformers).
``split_einsum_v2`` also cuts the query sequence into chunks, which keeps the attention matrices
small enough for the Neural Engine of mobile devices at high resolutions.

:func:`with_attention` returns a model computing the same function in that layout: every
``Transformer2DModel`` is replaced by :class:`NeuralEngineTransformer2D`, which uses the original
module's parameters (views, no copies). The input model is left untouched, so the reference and
the ``original`` variant keep computing with diffusers' own code.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any, Literal

import torch
import torch.nn.functional as F
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.transformers.transformer_2d import Transformer2DModel
from torch import nn

Attention = Literal["original", "split_einsum", "split_einsum_v2"]
ATTENTIONS: tuple[Attention, ...] = ("original", "split_einsum", "split_einsum_v2")

# Apple's query chunk for split_einsum_v2: the 4096-token first level of a 512 px UNet becomes 8 chunks.
QUERY_CHUNK = 512

# diffusers' processors that compute plain scaled dot-product attention; anything else (LoRA,
# IP-Adapter, custom processors) changes the function and must not be silently replaced.
_PLAIN_PROCESSORS = ("AttnProcessor", "AttnProcessor2_0")


def split_einsum(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, heads: int, scale: float, query_chunk: int | None
) -> torch.Tensor:
    """Multi-head attention on (B, C, 1, S) tensors, one head (and query chunk) at a time.

    ``query`` is (B, C, 1, Sq), ``key`` and ``value`` (B, C, 1, Sk); the result is (B, C, 1, Sq).
    Softmax runs over the key axis, which the einsums keep at dimension 1.
    """
    dim_head = query.shape[1] // heads
    key = key.transpose(1, 3)  # (B, Sk, 1, C): the first einsum contracts channels against it
    heads_out = []
    for head in range(heads):
        channels = slice(head * dim_head, (head + 1) * dim_head)
        query_head, key_head, value_head = query[:, channels], key[..., channels], value[:, channels]
        # Slices rather than torch.split: coremltools 9 cannot convert a split larger than the axis.
        length = query_head.shape[3]
        step = query_chunk or length
        chunks = [query_head[..., start : start + step] for start in range(0, length, step)]
        chunks_out = []
        for chunk in chunks:
            weights = torch.einsum("bchq,bkhc->bkhq", chunk, key_head) * scale
            chunks_out.append(torch.einsum("bkhq,bchk->bchq", weights.softmax(dim=1), value_head))
        heads_out.append(torch.cat(chunks_out, dim=3) if len(chunks_out) > 1 else chunks_out[0])
    return torch.cat(heads_out, dim=1)


def _conv(x: torch.Tensor, linear: nn.Linear) -> torch.Tensor:
    """``linear`` applied to the channels of a (B, C, 1, S) tensor, as a 1x1 convolution."""
    return F.conv2d(x, linear.weight[:, :, None, None], linear.bias)


def _layer_norm(x: torch.Tensor, norm: nn.LayerNorm) -> torch.Tensor:
    """LayerNorm over the channel axis of (B, C, 1, S)."""
    centered = x - x.mean(dim=1, keepdim=True)
    out = centered * torch.rsqrt((centered * centered).mean(dim=1, keepdim=True) + norm.eps)
    if norm.weight is not None:
        out = out * norm.weight.view(1, -1, 1, 1)
    if norm.bias is not None:
        out = out + norm.bias.view(1, -1, 1, 1)
    return out


def _check_transformer(transformer: nn.Module) -> None:
    """Refuse what the Neural Engine layout does not implement, rather than compute something else."""
    if not transformer.is_input_continuous:
        raise NotImplementedError("split_einsum supports continuous-input Transformer2DModel only")
    for block in transformer.transformer_blocks:
        if block.norm_type != "layer_norm" or block.pos_embed is not None or block.only_cross_attention:
            raise NotImplementedError(
                f"split_einsum supports layer_norm transformer blocks without positional embeddings, not"
                f" norm_type={block.norm_type!r}"
            )
        for attention in (block.attn1, block.attn2):
            if attention is None:
                continue
            processor = type(attention.processor).__name__
            plain = (
                processor in _PLAIN_PROCESSORS
                and attention.norm_cross is None
                and attention.spatial_norm is None
                and attention.group_norm is None
                and getattr(attention, "norm_q", None) is None
                and not attention.residual_connection
                and attention.rescale_output_factor == 1.0
            )
            if not plain:
                raise NotImplementedError(f"split_einsum supports plain attention, not {processor} with extras")
        activation = block.ff.net[0]
        if type(activation).__name__ not in ("GEGLU", "GELU"):
            raise NotImplementedError(f"split_einsum supports GEGLU and GELU feed-forwards, not {type(activation)}")


class NeuralEngineTransformer2D(nn.Module):
    """Drop-in replacement for a continuous-input ``Transformer2DModel``, computing in (B, C, 1, S)."""

    def __init__(self, transformer: nn.Module, query_chunk: int | None) -> None:
        super().__init__()
        _check_transformer(transformer)
        self.transformer = transformer
        self.query_chunk = query_chunk

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        *,
        attention_mask: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        cross_attention_kwargs: dict[str, Any] | None = None,
        return_dict: bool = True,
    ) -> Any:
        if attention_mask is not None or encoder_attention_mask is not None or cross_attention_kwargs:
            raise NotImplementedError("split_einsum takes no attention masks or cross_attention_kwargs")
        transformer = self.transformer
        batch, _, height, width = hidden_states.shape
        x = transformer.norm(hidden_states)
        x = _conv(x, transformer.proj_in) if transformer.use_linear_projection else transformer.proj_in(x)
        channels = x.shape[1]
        x = x.reshape(batch, channels, 1, height * width)
        # (B, S, C) -> (B, C, 1, S): once per transformer, shared by its blocks.
        context = None if encoder_hidden_states is None else encoder_hidden_states.transpose(1, 2).unsqueeze(2)
        for block in transformer.transformer_blocks:
            x = self._attention(block.attn1, _layer_norm(x, block.norm1), None) + x
            if block.attn2 is not None:
                x = self._attention(block.attn2, _layer_norm(x, block.norm2), context) + x
            x = self._feed_forward(block.ff, _layer_norm(x, block.norm3)) + x
        x = x.reshape(batch, channels, height, width)
        x = _conv(x, transformer.proj_out) if transformer.use_linear_projection else transformer.proj_out(x)
        output = x + hidden_states
        if not return_dict:
            return (output,)

        return Transformer2DModelOutput(sample=output)

    def _attention(self, attention: nn.Module, x: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        source = x if context is None else context
        out = split_einsum(
            _conv(x, attention.to_q),
            _conv(source, attention.to_k),
            _conv(source, attention.to_v),
            attention.heads,
            attention.scale,
            self.query_chunk,
        )
        return _conv(out, attention.to_out[0])  # to_out[1] is dropout

    @staticmethod
    def _feed_forward(feed_forward: nn.Module, x: torch.Tensor) -> torch.Tensor:
        activation, project_out = feed_forward.net[0], feed_forward.net[2]  # net[1] is dropout
        if type(activation).__name__ == "GEGLU":
            hidden, gate = _conv(x, activation.proj).chunk(2, dim=1)
            x = hidden * F.gelu(gate)
        else:
            x = F.gelu(_conv(x, activation.proj), approximate=activation.approximate)
        return _conv(x, project_out)


def _swap(module: nn.Module, replace: Callable[[nn.Module], nn.Module | None]) -> nn.Module:
    """``module`` with the submodules ``replace`` maps to a replacement swapped in.

    Modules on the path to a replacement are shallow copies with their own child table; everything
    else, parameters included, is shared with the original, which stays unchanged.
    """
    replacement = replace(module)
    if replacement is not None:
        return replacement
    children = {name: None if child is None else _swap(child, replace) for name, child in module._modules.items()}
    if all(children[name] is child for name, child in module._modules.items()):
        return module
    clone = copy.copy(module)
    clone._modules = children
    return clone


def with_attention(model: nn.Module, attention: Attention) -> nn.Module:
    """``model`` computing its transformers with ``attention``; ``original`` returns it unchanged."""
    if attention == "original":
        return model
    if attention not in ATTENTIONS:
        raise ValueError(f"unknown attention {attention!r}; one of {', '.join(ATTENTIONS)}")

    query_chunk = QUERY_CHUNK if attention == "split_einsum_v2" else None

    def replace(module: nn.Module) -> nn.Module | None:
        return NeuralEngineTransformer2D(module, query_chunk) if isinstance(module, Transformer2DModel) else None

    swapped = _swap(model, replace)
    if swapped is model:
        raise ValueError(f"{type(model).__name__} has no Transformer2DModel for {attention} to replace")
    return swapped
