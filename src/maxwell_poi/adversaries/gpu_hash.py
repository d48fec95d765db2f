"""The GPU miner's kernel: many rounds of real splitmix64 per element, in registers, on uint64.

One copy of the kernel, shared by the `gpu_miner` adversary and `bench/gpu/collect_traces.py`
(which loads this file by path when `import maxwell_poi` fails, so the module imports nothing of
the package: only numpy at import, torch and triton where a launch needs them).

Each element of an int64 tensor holds a splitmix64 state, read once. The kernel runs `rounds`
steps of the standard generator on it in registers::

    s += 0x9E3779B97F4A7C15
    z = s
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9
    z = (z ^ (z >> 27)) * 0x94D049BB133111EB
    z ^= z >> 31                      # z: the generator's next output (the "hash")

all on uint64 (logical shifts, wrapping multiplies), counts the outputs whose low bits are all
zero (a mining "difficulty" check) and folds the outputs by xor, then writes the state back once
(so the next launch continues the stream) and one digest and one hit count per block. With a few
hundred rounds that is thousands of integer operations per 16 bytes of memory traffic: the integer
pipes are saturated, the tensor cores and DRAM idle, as in a real miner. (A chain of PyTorch
elementwise ops over the tensor would instead stream it through DRAM once per op, and PyTorch's
`>>` on int64 is an arithmetic shift, which is not splitmix64.)

`reference_rounds` is the same computation in numpy (uint64) for checking the kernel on a CPU.
"""

import functools
from typing import Any

import numpy as np

GOLDEN = 0x9E3779B97F4A7C15
MIX1 = 0xBF58476D1CE4E5B9
MIX2 = 0x94D049BB133111EB
HIT_BITS = 20  # a hit: the output's low 20 bits are all zero (about one output in a million)
ROUNDS = 256  # splitmix64 steps per element per launch
BLOCK = 1024  # elements per Triton program (and per digest / hit count)

_U = np.uint64


def splitmix64_next(state: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One step of the standard splitmix64 generator on a uint64 array: (new state, output)."""
    s = np.asarray(state, dtype=np.uint64) + _U(GOLDEN)  # arrays wrap silently on overflow
    z = (s ^ (s >> _U(30))) * _U(MIX1)
    z = (z ^ (z >> _U(27))) * _U(MIX2)
    return s, z ^ (z >> _U(31))


def reference_rounds(
    states: np.ndarray, rounds: int = ROUNDS, block: int = BLOCK, hit_bits: int = HIT_BITS
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """What one kernel launch computes, in numpy: (states after `rounds` steps, the xor of every
    output per block of `block` elements (uint64), the hits per block (int64))."""
    s = np.array(states, dtype=np.uint64).ravel()
    n = s.size
    blocks = -(-n // block)
    acc = np.zeros(n, dtype=np.uint64)
    hits = np.zeros(n, dtype=np.int64)
    mask = _U((1 << hit_bits) - 1)
    for _ in range(rounds):
        s, z = splitmix64_next(s)
        acc ^= z
        hits += (z & mask) == 0
    pad = blocks * block - n
    acc_b = np.bitwise_xor.reduce(np.concatenate([acc, np.zeros(pad, np.uint64)]).reshape(blocks, block), 1)
    hits_b = np.concatenate([hits, np.zeros(pad, np.int64)]).reshape(blocks, block).sum(1)
    return s, acc_b, hits_b


def unavailable_reason() -> str | None:
    """Why the Triton kernel cannot run here (None when it can)."""
    try:
        import triton  # noqa: F401
    except ImportError as e:
        return f"triton is not importable ({e})"
    import os

    if os.environ.get("TRITON_INTERPRET") == "1":
        return None  # Triton's CPU interpreter runs it on CPU tensors
    import torch

    if not torch.cuda.is_available():
        return "no CUDA device (set TRITON_INTERPRET=1 to run the kernel in Triton's CPU interpreter)"
    return None


@functools.cache
def _kernel() -> Any:
    """The Triton kernel, built on first use (importing triton only then; TRITON_INTERPRET is read
    at this point, so the interpreter can be chosen per process). ROUNDS is a compile-time
    constant (one compilation per value; a runtime loop bound also trips Triton 3.6's interpreter
    under NumPy 2), and the loop over it stays a loop."""
    import triton
    import triton.language as tl

    @triton.jit
    def splitmix64_kernel(
        x_ptr, digest_ptr, hits_ptr, n, ROUNDS: tl.constexpr, HIT_MASK: tl.constexpr, BLOCK: tl.constexpr
    ):
        pid = tl.program_id(0)
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        inside = offs < n
        s = tl.load(x_ptr + offs, mask=inside, other=0).to(tl.uint64, bitcast=True)
        acc = tl.zeros([BLOCK], dtype=tl.uint64)
        hits = tl.zeros([BLOCK], dtype=tl.int32)
        for _ in range(ROUNDS):  # a loop, not unrolled (tl.static_range would unroll)
            s = s + 0x9E3779B97F4A7C15
            z = (s ^ (s >> 30)) * 0xBF58476D1CE4E5B9
            z = (z ^ (z >> 27)) * 0x94D049BB133111EB
            z = z ^ (z >> 31)
            acc = acc ^ z
            hits += ((z & HIT_MASK) == 0).to(tl.int32)
        tl.store(x_ptr + offs, s.to(tl.int64, bitcast=True), mask=inside)
        acc = tl.where(inside, acc, 0)
        hits = tl.where(inside, hits, 0)
        tl.store(digest_ptr + pid, tl.xor_sum(acc, axis=0).to(tl.int64, bitcast=True))
        tl.store(hits_ptr + pid, tl.sum(hits, axis=0))

    return splitmix64_kernel


def launch(x: Any, rounds: int = ROUNDS, block: int = BLOCK, hit_bits: int = HIT_BITS) -> tuple[Any, Any]:
    """Run the kernel once over the int64 tensor `x` (states, updated in place). Returns (digest
    per block as int64 holding uint64 bits, hits per block as int32), tensors on x's device."""
    import torch

    if x.dtype != torch.int64 or not x.is_contiguous():
        raise ValueError("x: expected a contiguous int64 tensor of splitmix64 states")
    n = x.numel()
    blocks = -(-n // block)
    digest = torch.empty(blocks, dtype=torch.int64, device=x.device)
    hits = torch.empty(blocks, dtype=torch.int32, device=x.device)
    _kernel()[(blocks,)](x, digest, hits, n, ROUNDS=rounds, HIT_MASK=(1 << hit_bits) - 1, BLOCK=block)
    return digest, hits


class GpuHasher:
    """A miner's state: `n` splitmix64 streams on `device`; `step()` runs one launch of `rounds`
    steps each and keeps the hit count on the device (no host sync)."""

    def __init__(self, n: int = 1 << 24, device: str = "cuda", rounds: int = ROUNDS, seed: int = 0) -> None:
        import torch

        self.n, self.rounds, self.device = n, rounds, device
        self.x = torch.arange(seed, seed + n, dtype=torch.int64, device=device)
        self.hits = torch.zeros((), dtype=torch.int64, device=device)
        self.launches = 0

    def step(self) -> None:
        _, hits = launch(self.x, self.rounds)
        self.hits += hits.sum()
        self.launches += 1

    @property
    def hashes(self) -> int:
        """splitmix64 outputs computed so far."""
        return self.launches * self.n * self.rounds
