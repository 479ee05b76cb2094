"""A tiny deterministic "language model" built from a seed, for end-to-end sandbox checks.

Vocabulary: the 95 printable ASCII characters. The model is an embedding, a two-layer MLP with a
residual, and an output head; decoding is greedy, so the same seed gives the same tokens on every
backend (CPU runs in float64 to stay independent of thread counts).

    >>> w = build_weights(3)
    >>> sorted(w)
    ['embed', 'head', 'w1', 'w2']
    >>> tokens = greedy_tokens(w, steps=5, seed=3)
    >>> len(tokens), all(0 <= t < VOCAB for t in tokens)
    (5, True)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

VOCAB = 95  # chr(32) .. chr(126)
DIM = 32
HIDDEN = 64
PROMPT_LEN = 4
SHAPES: dict[str, tuple[int, ...]] = {"embed": (VOCAB, DIM), "w1": (DIM, HIDDEN), "w2": (HIDDEN, DIM), "head": (DIM, VOCAB)}


def token_text(token_id: int) -> str:
    """The character of a token id."""
    return chr(32 + token_id)


def build_weights(seed: int) -> dict[str, torch.Tensor]:
    """Float32 weights drawn from a CPU generator seeded with ``seed`` (same on every host)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=gen, dtype=torch.float32) * (shape[0] ** -0.5)
            for name, shape in SHAPES.items()}


def check_weights(weights: dict[str, torch.Tensor]) -> None:
    """Refuse a weights dict whose names, shapes or dtypes differ from :data:`SHAPES`."""
    import torch

    if set(weights) != set(SHAPES):
        raise ValueError(f"selftest weights must be exactly {sorted(SHAPES)}, got {sorted(weights)}")
    for name, shape in SHAPES.items():
        t = weights[name]
        if tuple(t.shape) != shape or t.dtype != torch.float32:
            raise ValueError(f"selftest weight {name}: expected float32 {shape}, got {t.dtype} {tuple(t.shape)}")


def prompt_ids(seed: int) -> list[int]:
    """The seeded prompt (a few token ids)."""
    import torch

    gen = torch.Generator().manual_seed(seed + 1)
    return [int(i) for i in torch.randint(0, VOCAB, (PROMPT_LEN,), generator=gen)]


def greedy_tokens(weights: dict[str, torch.Tensor], *, steps: int, seed: int, device: str = "cpu") -> list[int]:
    """Greedy-decode ``steps`` tokens after the seeded prompt."""
    import torch

    dtype = torch.float64 if device == "cpu" else torch.float32
    w = {k: v.to(device=device, dtype=dtype) for k, v in weights.items()}
    state = torch.zeros(DIM, device=device, dtype=dtype)
    out: list[int] = []
    ids = prompt_ids(seed)
    with torch.no_grad():
        for i in range(len(ids) + steps - 1):
            tok = ids[i] if i < len(ids) else out[-1]
            state = 0.5 * state + w["embed"][tok]                       # [D]
            h = torch.tanh(state @ w["w1"]) @ w["w2"] + state            # [D]
            logits = h @ w["head"]                                       # [V]
            if i >= len(ids) - 1:
                out.append(int(torch.argmax(logits).item()))
    return out


def matmul_check(n: int, device: str, seed: int) -> float:
    """Max relative error of an n x n float32 matmul on ``device`` against float64 on the CPU."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(n, n, generator=gen)
    b = torch.randn(n, n, generator=gen)
    ref = a.double() @ b.double()
    got = (a.to(device) @ b.to(device)).double().cpu()
    return float(((got - ref).abs().max() / ref.abs().max()).item())
