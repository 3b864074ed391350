"""How fast `lmforge plan` answers (interpreter start included), and that it never imports torch.

    python bench/plan_speed.py            # prints the median wall time of a few invocations

A target, not a test: the planner should answer in well under a second (it is arithmetic on the
config). Timing lives here because CI machines are too loaded for timing assertions.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = {
    "plan": ["plan", "--model", "llama2-7b", "--gpus", "8", "--gpu-mem-gb", "80", "--tokens", "2T", "--json"],
    "suggest": ["plan", "--model", "llama3-8b", "--gpus", "16", "--suggest", "--json"],
    "suggest-lora": ["plan", "--model", "llama2-13b", "--mode", "lora", "--gpu", "4090", "--suggest", "--json"],
    "calibration": ["plan", "--calibration", "--json"],
}


def main(repeats: int = 5) -> int:
    for name, args in COMMANDS.items():
        walls = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            r = subprocess.run([sys.executable, "-m", "lmforge", *args], cwd=ROOT, capture_output=True, text=True,
                               check=False)
            walls.append(time.perf_counter() - t0)
            if r.returncode != 0:
                print(f"{name}: failed: {r.stderr.strip()}")
                return 1
        print(f"{name:12s} median {statistics.median(walls):.2f} s wall over {repeats} runs "
              f"(min {min(walls):.2f} s), interpreter start included")
    code = ("import sys; from lmforge.cli import main; main(['plan', '--model', 'llama3-8b', '--suggest', '--json']); "
            "sys.stderr.write('torch imported' if 'torch' in sys.modules else 'no torch')")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=False)
    print("torch import:", r.stderr.strip().splitlines()[-1] if r.stderr.strip() else "?")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
