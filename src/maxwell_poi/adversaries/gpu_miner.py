"""Cheat (GPU only): an integer-hash mining kernel keeps the GPU busy (integer pipes, no tensor
cores) between invented tokens streamed at an honest pace. L1 on NVML telemetry sees integer
utilisation without tensor-pipe activity and an energy profile unlike inference."""

from __future__ import annotations

import sys
import time

import torch

from ._agent import parser, run
from ._fake import paced_garbage_agent


def hash_until(deadline: float, n: int = 1 << 24) -> None:
    x = torch.arange(n, device="cuda", dtype=torch.int64)
    while time.perf_counter() < deadline:
        for _ in range(16):  # xorshift-multiply rounds: integer ALU work only
            x = x ^ (x << 13)
            x = x ^ (x >> 7)
            x = x * 0x2545F4914F6CDD1D
        torch.cuda.synchronize()


def main() -> None:
    args = parser(__doc__).parse_args()
    if not torch.cuda.is_available():
        print("gpu_miner: needs a CUDA GPU; none here", file=sys.stderr)
        sys.exit(2)
    run(args, paced_garbage_agent(hash_until))


if __name__ == "__main__":
    main()
