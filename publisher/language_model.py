"""Language models: a transformers causal LM as one stateful Core ML ML Program.

The package follows what its consumers read:

- swift-transformers, ``Sources/Models/LanguageModel.swift``: ``LanguageModel.Keys`` names the input
  ``inputIds`` (Int32, (1, n)), the mask ``causalMask``, the states ``keyCache`` and ``valueCache`` and the
  output ``logits`` (rank 3, the next-token scores read at the last position);
  ``kvCacheAvailability(for:)`` takes a model with both states as ``LanguageModelWithStatefulKVCache``, whose
  ``init`` demands a *ranged* ``inputIds`` length (``contextRange(from:)`` reads the range of its last axis: the
  prompt is fed whole, then one token per step); ``modelName`` reads the user metadata key
  ``co.huggingface.exporters.name``, the Hub repo whose ``config.json`` and tokenizer files it downloads
  (``LanguageModelConfigurationFromHub``), so it names the published repository, which ships them.
- Apple's stateful Llama and Mistral exports ("On Device Llama 3.1 with Core ML",
  machinelearning.apple.com/research/core-ml-on-device-llama; ``apple/mistral-coreml``'s
  ``StatefulMistral7BInstructInt4.mlpackage``): one key and one value state of shape
  (layers, batch, kv heads, context, head dim), written in place with slice updates, and a ``causalMask`` of
  shape (1, 1, query, end) whose last axis says how many cache positions the call sees: the past length is
  ``end - query``. iOS18 / macOS15 is the first target with states.

The module is the component's wrapper (the traced :class:`StatefulCausalLM`) and its I/O contract (the names
below and :func:`causal_mask`), as :mod:`publisher.wrappers` is the diffusion components'. Its conversion is
:func:`publisher.convert.convert_language_model`, its source :mod:`publisher.language_model_source`, its parity
(prefill and decode through the executor) :mod:`publisher.language_model_parity`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from publisher.errors import PublisherError

INPUT_IDS = "inputIds"
CAUSAL_MASK = "causalMask"
KEY_CACHE = "keyCache"
VALUE_CACHE = "valueCache"
LOGITS = "logits"
EXPORTER_KEY = "co.huggingface.exporters"


# ---------------------------------------------------------------------------------------------
# The traced module


class SliceCache:
    """The KV cache transformers' attention writes into: the wrapper's two buffers, one slice per call.

    A plain object with the two methods the attention layers call (``update``, ``get_seq_length``): transformers'
    own caches grow by concatenation, which a fixed-size Core ML state cannot do.
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, past: Any) -> None:
        self.keys, self.values, self.past = keys, values, past

    def update(self, key: torch.Tensor, value: torch.Tensor, layer: int, *args: Any, **kwargs: Any
               ) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.past + key.shape[-2]
        self.keys[layer, :, :, self.past:end, :] = key
        self.values[layer, :, :, self.past:end, :] = value
        return self.keys[layer, :, :, :end, :], self.values[layer, :, :, :end, :]

    def get_seq_length(self, *args: Any) -> Any:
        return self.past


class _ShapeProbe:
    """A cache that records each layer's key and value shapes (one forward of one token)."""

    def __init__(self) -> None:
        self.shapes: dict[int, tuple[int, ...]] = {}

    def update(self, key: torch.Tensor, value: torch.Tensor, layer: int, *args: Any, **kwargs: Any
               ) -> tuple[torch.Tensor, torch.Tensor]:
        self.shapes[layer] = tuple(key.shape)
        return key, value

    def get_seq_length(self, *args: Any) -> int:
        return 0


def cache_shape(model: torch.nn.Module, context_length: int) -> tuple[int, ...]:
    """(layers, 1, kv heads, context, head dim), measured from the model's own attention rather than read from
    configs, whose head counts are named differently per family (Falcon's multi-query ``num_kv_heads``)."""
    probe = _ShapeProbe()
    with torch.no_grad():
        model(input_ids=torch.zeros((1, 1), dtype=torch.long), cache=probe, use_cache=True,
              attention_mask=torch.zeros((1, 1, 1, 1)), position_ids=torch.zeros((1, 1), dtype=torch.long))
    shapes = set(probe.shapes.values())
    if len(shapes) != 1 or len(probe.shapes) != model.config.num_hidden_layers:
        raise PublisherError(f"the model's layers cache keys of different shapes ({sorted(shapes)}): one state per"
                             " layer kind is not supported")
    batch, heads, _, head_dim = shapes.pop()
    return (len(probe.shapes), batch, heads, context_length, head_dim)


class StatefulCausalLM(torch.nn.Module):
    """``logits = model(inputIds, causalMask)`` with the KV cache as the buffers ``keyCache`` / ``valueCache``.

    The buffers' names are the Core ML states' (coremltools matches them by name). Positions and the past
    length come from the two inputs' shapes, as in Apple's export: one program serves prefill and decode.
    """

    def __init__(self, model: torch.nn.Module, context_length: int) -> None:
        super().__init__()
        self.model = model
        shape = cache_shape(model, context_length)
        self.register_buffer(KEY_CACHE, torch.zeros(shape))
        self.register_buffer(VALUE_CACHE, torch.zeros(shape))

    def forward(self, input_ids: torch.Tensor, causal_mask: torch.Tensor) -> torch.Tensor:
        end = causal_mask.shape[-1]
        past = end - input_ids.shape[-1]
        cache = SliceCache(getattr(self, KEY_CACHE), getattr(self, VALUE_CACHE), past)
        positions = torch.arange(past, end).unsqueeze(0)
        # A 4D mask is used as given (transformers' create_causal_mask returns it unchanged).
        return self.model(input_ids=input_ids, attention_mask=causal_mask, position_ids=positions, cache=cache,
                          use_cache=True).logits


def causal_mask(query: int, end: int) -> np.ndarray:
    """Apple's additive mask for ``query`` new tokens after ``end - query`` cached ones: (1, 1, query, end)."""
    past = end - query
    mask = np.zeros((1, 1, query, end), dtype=np.float16)
    rows = np.arange(query)[:, None] + past
    mask[0, 0][np.arange(end)[None, :] > rows] = -np.inf
    return mask
