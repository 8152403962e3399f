"""Where the renderer kernels' time goes: time builds of `render.cu` with one part removed (wrong results, timing only).

    python3 benchmarks/renderer_whatif.py [--variants base forward-no-hit-loop ...] [--cases 0] [--markdown FILE]

Each variant is the committed kernel source with the textual edits listed in VARIANTS (each edit must match the
source exactly once, so that a change to the kernels makes this script fail instead of timing something else). The
package and `benchmarks/renderer.py` are copied into a temporary folder, the edits applied there, and the copy's
`renderer.py --quick` timed in a child process with its own kernel cache. The difference between a variant and
`base` in the same run bounds what any speed-up of the removed part can give.
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from pathlib import Path

from renderer import child_times, emit  # (benchmarks/renderer.py, beside this script)

ROOT = Path(__file__).resolve().parents[1]

# the forward's choice of the staged stores (16-bit maps)
STAGED_STORES = "    if constexpr (sizeof(T) == 2) {  // (16-bit maps"

# variant name -> (what it removes, [(old text, new text), ...])
VARIANTS: dict[str, tuple[str, list[tuple[str, str]]]] = {
    "base": ("nothing", []),
    "forward-no-hit-loop": (
        "the forward's per-pixel loop over the group's hits",
        [("        if (group_in_map) {\n            for (int wb", "        if (false) {\n            for (int wb")],
    ),
    "forward-weights-only": (
        "the forward's feature reads and multiply-adds (the weights are still computed and summed)",
        [("#pragma unroll\n                    for (int k4 = 0; k4 < CPT / 4; ++k4) {\n                        const float4 f = f4[k4];",
          "acc[0] += g;\n                    for (int k4 = 0; k4 < 0; ++k4) {\n                        const float4 f = f4[k4];")],
    ),
    "forward-no-weights": (
        "the forward's pixel weights (a shared value in their place)",
        [("const float g = pixel_weight(geo_s[jj], px, py).g;", "const float g = geo_s[jj].hinv;")],
    ),
    "forward-no-feature-copy": (
        "the forward's copy of the hits' features into shared memory",
        [("    copy_feature_rows<CPT, 4>(\n        total,", "    if (false) copy_feature_rows<CPT, 4>(\n        total,")],
    ),
    "forward-no-stores": (
        "the forward's map stores (kept only under a condition that never holds)",
        [(STAGED_STORES, "    if constexpr (false) {  // (16-bit maps"),
         ("    if (x < W && y < H) {\n        const size_t plane", "    if (x < W && y < H && acc[0] == 1234.5f) {\n        const size_t plane")],
    ),
    "forward-stores-one-line": (
        "the forward's scatter of each store over 4 map rows (each warp store writes 128 contiguous bytes instead, to "
        "the wrong pixels; 16-bit maps stored from registers too)",
        [(STAGED_STORES, "    if constexpr (false) {  // (16-bit maps"),
         ("        T* o = out + (size_t)b * C * plane + (size_t)y * W + x;",
          "        T* o = out + (size_t)b * C * plane + (size_t)blockIdx.x * THREADS + threadIdx.x;")],
    ),
    "forward-stores-float4": (
        "the forward's one-value stores (each lane stores its values 4 at a time, 512 contiguous bytes per warp "
        "store, to the wrong pixels; fp32 only)",
        [("        T* o = out + (size_t)b * C * plane + (size_t)y * W + x;\n        if (C == CPT) {",
          "        T* o = out + (size_t)b * C * plane + (size_t)y * W + x;\n"
          "        if (sizeof(T) == 4 && C == CPT) {\n"
          "            float4* o4 = reinterpret_cast<float4*>(out + (size_t)b * C * plane + (size_t)blockIdx.x * THREADS * CPT)"
          " + warp * 32 * (CPT / 4) + lane;\n"
          "#pragma unroll\n"
          "            for (int k4 = 0; k4 < CPT / 4; ++k4) o4[32 * k4] = make_float4(acc[4 * k4], acc[4 * k4 + 1], "
          "acc[4 * k4 + 2], acc[4 * k4 + 3]);\n"
          "        } else if (C == CPT) {")],
    ),
    "backward-no-pixel-loop": (
        "the backward's walk over each token's pixels",
        [("            if (rw > 0 && rh > 0) {", "            if (false) {")],
    ),
}


def apply_edits(source: str, edits: list[tuple[str, str]]) -> str:
    """`source` with each (old, new) replacement made; each old text must occur exactly once."""
    for old, new in edits:
        count = source.count(old)
        if count != 1:
            raise ValueError(f"edit does not match the kernel source exactly once ({count} matches): {old!r}")
        source = source.replace(old, new)
    return source


def patched_copy(edits: list[tuple[str, str]], folder: Path) -> Path:
    """Copy the package and the benchmark into `folder` and apply `edits` to the copy's kernel source."""
    shutil.copytree(ROOT / "splat_cuda", folder / "splat_cuda", ignore=shutil.ignore_patterns("__pycache__"))
    (folder / "benchmarks").mkdir()
    shutil.copy2(ROOT / "benchmarks" / "renderer.py", folder / "benchmarks" / "renderer.py")
    kernel = folder / "splat_cuda" / "kernels" / "render.cu"
    kernel.write_text(apply_edits(kernel.read_text(), edits))
    return folder / "benchmarks" / "renderer.py"


def time_variant(name: str, cases: list[int], reps: int) -> dict[tuple[str, str], str]:
    """{(case, variant label): GPU us/call} from the patched copy's quick benchmark."""
    with tempfile.TemporaryDirectory() as tmp:
        script = patched_copy(VARIANTS[name][1], Path(tmp) / "pkg")
        return child_times(script, dict(os.environ, SPLAT_CUDA_CACHE=str(Path(tmp) / "cache")), cases, reps)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--cases", type=int, nargs="+", default=[0], help="benchmarks/renderer.py case indices")
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--repeat", type=int, default=1, help="time every variant this many times, interleaved")
    parser.add_argument("--markdown", type=Path)
    args = parser.parse_args()
    results: dict[str, list[dict]] = {name: [] for name in args.variants}
    for _ in range(args.repeat):
        for name in args.variants:
            results[name].append(time_variant(name, args.cases, args.reps))
            print(f"{name}: {results[name][-1]}", flush=True)
    labels = sorted({key for runs in results.values() for run in runs for key in run})
    lines = ["| variant (removes) | " + " | ".join(f"{case}: {label}" for case, label in labels) + " |",
             "|---|" + "---|" * len(labels)]
    for name, runs in results.items():
        cells = [" / ".join(run.get(key, "-") for run in runs) for key in labels]
        lines.append(f"| {name} ({VARIANTS[name][0]}) | " + " | ".join(cells) + " |")
    emit(lines, args.markdown)


if __name__ == "__main__":
    main()
