"""bitswitch's CUDA kernels against torch's on one NVIDIA GPU: `bitswitch bench gpu` (see
python/bitswitch/bench_gpu.py). Prints a table last.

    python bench/gpu.py [--quick] [--no-qmatmul] [--no-attention] [--decode-only] [--e2e 0.6b,8b]
"""

import sys

from bitswitch.bench_gpu import main

if __name__ == "__main__":
    sys.exit(main())
