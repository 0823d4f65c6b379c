"""Checks that every instruction-set version of jaxsample's CPU kernels gives the same bits.

The kernels (jaxsample/native) are built with GCC's ``target_clones`` (AVX-512, AVX2 + FMA,
the baseline) and the loader picks one for the machine, so a test suite only ever runs one
of them. This script compiles a small C++ harness over ``rows.cc`` once per ``-march``
(``x86-64``, ``-v2``, ``-v3``, ``-v4``, each with ``-DJAXSAMPLE_NO_CLONES``: one version),
once with the clones, and with any other compiler named by ``--cxx``; each build runs every
kernel on 64 rows of real SmolLM2 logits (scripts/real_logits.py's dump) and prints a
checksum of the bits of all outputs (block maxima, candidates and normalizer, log-sum-exp
and top 20, four top_p thresholds per row). It exits 1 when two checksums differ.

Usage (about a minute; x86-64 with GCC; a ``-march`` the CPU lacks is skipped)::

    PYTHONPATH=. .venv/bin/python scripts/check_kernel_clones.py [--cxx clang++]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from real_logits import load_real_logits  # noqa: E402

ROWS_CC = Path(__file__).resolve().parents[1] / "jaxsample" / "native" / "rows.cc"

HARNESS = r"""
#include "ROWS_CC"
#include <cmath>
#include <cstdio>
int main(int argc, char** argv) {
  const int64_t rows = 64, n = 49152;
  std::vector<float> z(rows * n), w(n);
  FILE* f = std::fopen(argv[1], "rb");
  const size_t want = static_cast<size_t>(rows * n);
  if (f == nullptr || std::fread(z.data(), 4, want, f) != want) return 2;
  std::fclose(f);
  uint64_t h = 1469598103934665603ull;  // FNV-1a over the outputs' bytes
  auto mix = [&](const void* p, size_t len) {
    const unsigned char* c = static_cast<const unsigned char*>(p);
    for (size_t i = 0; i < len; ++i) { h ^= c[i]; h *= 1099511628211ull; }
  };
  Scratch s;
  MassScratch ms;
  std::vector<float> block_max(n / 32), values(128), top20(20);
  std::vector<int32_t> ids(128), ids20(20);
  for (int64_t r = 0; r < rows; ++r) {
    const float* x = z.data() + r * n;
    float total, log_total;
    CandidatesRow(x, n, 128, 32, true, block_max.data(), values.data(), ids.data(), &total, s);
    mix(block_max.data(), block_max.size() * 4);
    mix(values.data(), 512);
    mix(ids.data(), 512);
    mix(&total, 4);
    LogTotalTopKRow(x, n, 20, &log_total, top20.data(), ids20.data(), s);
    mix(&log_total, 4);
    mix(top20.data(), 80);
    mix(ids20.data(), 80);
    for (int64_t i = 0; i < n; ++i) w[i] = std::exp(x[i] - values[0]);
    for (float p : {0.5f, 0.9f, 0.95f, 0.99f}) {
      const float t = MassThresholdRow(x, w.data(), n, p * total, ms);
      mix(&t, 4);
    }
  }
  std::printf("%016llx\n", static_cast<unsigned long long>(h));
  return 0;
}
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cxx", action="append", default=[], help="another compiler to compare")
    args = ap.parse_args()
    data = load_real_logits()
    idx = np.random.default_rng(0).choice(data.shape[0], 64, replace=False)
    flags = ["-O3", "-std=c++17", "-ffp-contract=off", f"-I{jax.ffi.include_dir()}"]
    builds = [
        (f"g++ -march={m}", "g++", [f"-march={m}", "-DJAXSAMPLE_NO_CLONES"])
        for m in ("x86-64", "x86-64-v2", "x86-64-v3", "x86-64-v4")
    ]
    builds.append(("g++ with the clones", "g++", []))
    builds += [(cxx, cxx, []) for cxx in args.cxx]
    sums = {}
    with tempfile.TemporaryDirectory() as tmp:
        rows = Path(tmp) / "rows.bin"
        (data[idx].astype(np.float32) / np.float32(0.8)).tofile(rows)
        src = Path(tmp) / "harness.cc"
        src.write_text(HARNESS.replace("ROWS_CC", str(ROWS_CC)))
        for i, (name, cxx, extra) in enumerate(builds):
            exe = Path(tmp) / f"harness{i}"
            done = subprocess.run(
                [cxx, *flags, *extra, str(src), "-o", str(exe)], capture_output=True, text=True
            )
            if done.returncode != 0:
                print(f"{name:24s} did not build: {done.stderr.strip().splitlines()[-1:]}")
                continue
            run = subprocess.run([str(exe), str(rows)], capture_output=True, text=True)
            if run.returncode != 0:  # e.g. an instruction set this CPU lacks
                print(f"{name:24s} did not run (exit {run.returncode})")
                continue
            sums[name] = run.stdout.strip()
            print(f"{name:24s} {sums[name]}")
    same = len(set(sums.values())) == 1
    print("the same bits in every build" if same else "BITS DIFFER")
    return 0 if same and sums else 1


if __name__ == "__main__":
    sys.exit(main())
