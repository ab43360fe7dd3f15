"""Recurrent layers: lstm, gru, rnn (MIL recurrent), step by step over x [seq, batch, input].

Gate orders follow MIL: lstm [input, forget, output, cell], gru [reset, output, update]. A
"reverse" layer reads the sequence backwards and emits its outputs in that reading order; the
backward half of a bidirectional lstm is re-aligned with the input's time steps.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from publisher.executor.errors import ExecutorError
from publisher.executor.ops.registry import OpArgs, Result, register

State = tuple[torch.Tensor, ...]
Cell = Callable[[torch.Tensor, State], State]

_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "sigmoid": torch.sigmoid,
    "tanh": torch.tanh,
    "relu": torch.relu,
    # MIL's recurrent layers use the activations' default parameters: alpha = beta = 1.
    "scaled_tanh": torch.tanh,
    "hard_sigmoid": lambda x: torch.clamp(0.2 * x + 0.5, 0, 1),
    "linear": lambda x: x,
}


def _activation(a: OpArgs, name: str, default: str) -> Callable[[torch.Tensor], torch.Tensor]:
    key = a.str(name, default).lower()
    if key not in _ACTIVATIONS:
        raise ExecutorError(f"unknown {name} {key!r}")
    return _ACTIVATIONS[key]


def _scan(cell: Cell, x: torch.Tensor, state: State, reverse: bool) -> tuple[torch.Tensor, State]:
    """Outputs (each step's first state, in reading order) and the final state."""
    outputs = []
    for t in reversed(range(x.shape[0])) if reverse else range(x.shape[0]):
        state = cell(x[t], state)
        outputs.append(state[0])
    return torch.stack(outputs), state


def _emit(a: OpArgs, outputs: torch.Tensor, state: State) -> Result:
    return (outputs if a.bool("output_sequence") else outputs[-1:], *state)


def _zeros_or(t: torch.Tensor | None, size: int, like: torch.Tensor) -> torch.Tensor:
    return torch.zeros(size, dtype=like.dtype) if t is None else t


@register("rnn")
def rnn(a: OpArgs) -> Result:
    x, w_ih, w_hh = a["x"], a["weight_ih"], a["weight_hh"]
    bias = _zeros_or(a.opt("bias"), w_ih.shape[0], x)
    act = _activation(a, "activation", "tanh")

    def cell(xt: torch.Tensor, state: State) -> State:
        return (act(xt @ w_ih.T + state[0] @ w_hh.T + bias),)

    outputs, state = _scan(cell, x, (a["initial_h"],), a.str("direction", "forward") == "reverse")
    return _emit(a, outputs, state)


@register("gru")
def gru(a: OpArgs) -> Result:
    x, w_ih, w_hh = a["x"], a["weight_ih"], a["weight_hh"]
    # iOS18 splits the biases: `input_bias` on W_i x, `bias` on W_h h. They only differ inside the
    # output gate with reset_after (r * (W_ho h + b_ho)); earlier opsets have `bias` alone.
    b_i = _zeros_or(a.opt("input_bias"), w_ih.shape[0], x)
    b_h = _zeros_or(a.opt("bias"), w_ih.shape[0], x)
    reset_after = a.bool("reset_after")
    gate, act = _activation(a, "recurrent_activation", "sigmoid"), _activation(a, "activation", "tanh")
    w_hr, w_ho, w_hz = w_hh.chunk(3)
    b_hr, b_ho, b_hz = b_h.chunk(3)

    def cell(xt: torch.Tensor, state: State) -> State:
        h = state[0]
        i_r, i_o, i_z = (xt @ w_ih.T + b_i).chunk(3, dim=-1)
        r = gate(i_r + h @ w_hr.T + b_hr)
        z = gate(i_z + h @ w_hz.T + b_hz)
        hidden = r * (h @ w_ho.T + b_ho) if reset_after else (r * h) @ w_ho.T + b_ho
        o = act(i_o + hidden)
        return ((1 - z) * o + z * h,)

    outputs, state = _scan(cell, x, (a["initial_h"],), a.str("direction", "forward") == "reverse")
    return _emit(a, outputs, state)


def _lstm_cell(a: OpArgs, suffix: str, x: torch.Tensor) -> Cell:
    w_ih, w_hh = a["weight_ih" + suffix], a["weight_hh" + suffix]
    hidden = w_hh.shape[1]
    bias = _zeros_or(a.opt("bias" + suffix), 4 * hidden, x)
    p_i, p_f, p_o = _zeros_or(a.opt("peephole" + suffix), 3 * hidden, x).chunk(3)
    gate = _activation(a, "recurrent_activation", "sigmoid")
    cell_act = _activation(a, "cell_activation", "tanh")
    act = _activation(a, "activation", "tanh")
    clip = a.value("clip")

    def cell(xt: torch.Tensor, state: State) -> State:
        h, c = state
        g_i, g_f, g_o, g_z = (xt @ w_ih.T + h @ w_hh.T + bias).chunk(4, dim=-1)
        c = gate(g_f + c * p_f) * c + gate(g_i + c * p_i) * cell_act(g_z)
        if clip is not None:
            c = torch.clamp(c, -float(clip), float(clip))
        return gate(g_o + c * p_o) * act(c), c

    return cell


@register("lstm")
def lstm(a: OpArgs) -> Result:
    x, h0, c0 = a["x"], a["initial_h"], a["initial_c"]
    direction = a.str("direction", "forward")
    forward = _lstm_cell(a, "", x)
    if direction != "bidirectional":
        outputs, state = _scan(forward, x, (h0, c0), direction == "reverse")
        return _emit(a, outputs, state)
    h_f, h_b = h0.chunk(2, dim=-1)
    c_f, c_b = c0.chunk(2, dim=-1)
    out_f, (h_f, c_f) = _scan(forward, x, (h_f, c_f), reverse=False)
    out_b, (h_b, c_b) = _scan(_lstm_cell(a, "_back", x), x, (h_b, c_b), reverse=True)
    if a.bool("output_sequence"):
        outputs = torch.cat([out_f, out_b.flip(0)], dim=-1)
    else:
        outputs = torch.cat([out_f[-1:], out_b[-1:]], dim=-1)
    return outputs, torch.cat([h_f, h_b], dim=-1), torch.cat([c_f, c_b], dim=-1)
