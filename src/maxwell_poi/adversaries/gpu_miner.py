"""Cheat (GPU only): an integer-hash mining kernel keeps the GPU busy (integer pipes, no tensor
cores) between invented tokens streamed at an honest pace. L1 on NVML telemetry sees integer
utilisation without tensor-pipe activity and an energy profile unlike inference.

The kernel is gpu_hash.py's Triton kernel: hundreds of rounds of real splitmix64 (uint64) per
element in registers, each element read and written once, as a miner's inner loop is."""

from __future__ import annotations

import sys
import time

import torch

from ._agent import parser, run
from ._fake import paced_garbage_agent
from .gpu_hash import GpuHasher, unavailable_reason

_HASHERS: dict[int, GpuHasher] = {}


def hash_until(deadline: float, n: int = 1 << 22) -> None:
    """Launch the mining kernel back to back until `deadline` (each launch a few ms on an H100)."""
    hasher = _HASHERS.get(n)
    if hasher is None:
        hasher = _HASHERS[n] = GpuHasher(n, "cuda")
    while time.perf_counter() < deadline:
        hasher.step()
        torch.cuda.synchronize()  # keep the queue short so the work ends with the pace


def main() -> None:
    args = parser(__doc__).parse_args()
    why = unavailable_reason()
    if why or not torch.cuda.is_available():
        print(f"gpu_miner: needs a CUDA GPU and triton: {why or 'no CUDA device'}", file=sys.stderr)
        sys.exit(2)
    run(args, paced_garbage_agent(hash_until), prober=None)  # no weights: it cannot answer a work probe


if __name__ == "__main__":
    main()
