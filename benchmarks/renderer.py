"""Check and time the GPS-token renderers in one run: `python3 benchmarks/renderer.py [--markdown FILE]`.

On a GPU: for each issue size, checks the CUDA kernels against the float64 PyTorch reference, then
times every variant (forward, backward, forward+backward in fp32, deterministic, bf16) and the
PyTorch reference on the same inputs. GPU time per call comes from CUDA events around replays of a
CUDA graph that holds `--calls` calls over rotating input sets (so there are no launch gaps, and enough sets
that no call finds its inputs in L2); the median over `--reps` replays is reported, after warm-up.
"eager" is the same on plain Python calls, host overhead included. Bandwidth counts the map written
(forward) and dL/dout read (backward) once, plus the tokens and their gradient.

Without a GPU it times the PyTorch reference on the CPU (forward+backward) for the sizes of the
reference renderer's issue.

Token geometry imitates GPSToken's partition: sigma log-uniform in [0.5, 2] x (2/3)/sqrt(N) (the
sigma of an average partition cell), rho uniform in (-0.9, 0.9), centres uniform over the map,
features standard normal.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from splat_cuda import render_reference  # noqa: E402

GPU_CASES = [  # name, B, N, C, map side
    ("B64 N256 C32 64x64", 64, 256, 32, 64),
    ("B16 N128 C16 64x64 (M128 batch)", 16, 128, 16, 64),
    ("B4 N4096 C32 256x256 (high res)", 4, 4096, 32, 256),
]
CPU_CASES = [("B64 N256 C32 64x64", 64, 256, 32, 64), ("B1 N4096 C32 256x256", 1, 4096, 32, 256)]

# Measured on one H200 with the released code (SPEC.md section 2), for the first size.
RELEASED_MS = {"B64 N256 C32 64x64": (9.1, 488.0)}
DENSE_FORMULA_MS = {"B64 N256 C32 64x64": 15.2}


def make_tokens(batch, num, channels, seed, device, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    cell = (2.0 / 3.0) / num**0.5
    sigma = cell * torch.exp(torch.empty(batch, num, 2).uniform_(-0.693, 0.693, generator=gen))
    rho = torch.empty(batch, num, 1).uniform_(-0.9, 0.9, generator=gen)
    mu = torch.empty(batch, num, 2).uniform_(-1.0, 1.0, generator=gen)
    feats = torch.randn(batch, num, channels, generator=gen)
    return torch.cat([sigma, rho, mu, feats], -1).to(device=device, dtype=dtype)


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def graph_time_us(fn, inputs, calls, reps):
    """Median GPU time per call (us) of `fn(*inputs[i % len(inputs)])`, replayed from a CUDA graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for args in inputs:
            fn(*args)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            fn(*inputs[i % len(inputs)])
    for _ in range(3):
        graph.replay()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / calls)
    return statistics.median(times)


def eager_time_us(fn, inputs, calls, reps):
    for args in inputs:
        fn(*args)
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for i in range(calls):
            fn(*inputs[i % len(inputs)])
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / calls)
    return statistics.median(times)


def input_sets(minimum, batch, num, channels, side):
    """Rotating input sets: at least `minimum`, and enough that one pass over them (tokens, map, dL/dout) moves
    twice the GPU's L2 cache, so that no call finds its inputs left in L2 by an earlier one."""
    per_set = 4 * (batch * num * (5 + channels) + 2 * batch * channels * side * side)
    l2_bytes = torch.cuda.get_device_properties(torch.cuda.current_device()).L2_cache_size
    return max(minimum, -(-2 * l2_bytes // per_set))


def run_gpu(args):
    from splat_cuda import op, render

    device = torch.device("cuda")
    rows, checks = [], []
    cases = [GPU_CASES[i] for i in args.cases] if args.cases else GPU_CASES
    for name, batch, num, channels, side in cases:
        num_sets = input_sets(args.sets, batch, num, channels, side)
        sets = [make_tokens(batch, num, channels, seed, device) for seed in range(num_sets)]
        gouts = [torch.randn(batch, channels, side, side, device=device) for _ in range(num_sets)]

        # correctness against the float64 reference, on the first input set
        tok = sets[0].clone().requires_grad_()
        out = render(tok, side)
        out.backward(gouts[0])
        ref_tok = sets[0].double().clone().requires_grad_()
        ref = render_reference(ref_tok, side, side)
        ref.backward(gouts[0].double())
        checks.append((name, rel_err(out, ref), rel_err(tok.grad, ref_tok.grad)))

        map_bytes = batch * channels * side * side * 4
        token_bytes = sets[0].numel() * 4
        variants = []
        for dtype_label, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            toks = [t.to(dtype) for t in sets]
            gos = [g.to(dtype) for g in gouts]
            fwd_in = [(t,) for t in toks]
            both_in = list(zip(toks, gos))
            esize = torch.tensor([], dtype=dtype).element_size()
            saved = {t.data_ptr(): op.render_forward(t, side, side, 3.0, False, False)[1] for t in toks}

            def fwd(t):  # (no gradient wanted: the forward zeroes no accumulator)
                return op.render_forward(t, side, side, 3.0, False, False)

            def bwd(t, g, deterministic=False):  # with the forward's masks, zeroing its own gradient buffer
                return op.render_backward(t, saved[t.data_ptr()], g, side, side, 3.0, deterministic)

            def both(t, g, deterministic=False):  # through autograd, as in training
                leaf = t.detach().requires_grad_()
                return torch.autograd.grad(render(leaf, side, deterministic=deterministic), leaf, g)

            def det(t, g):
                return both(t, g, True)

            map_b = map_bytes // 4 * esize
            tok_b = token_bytes // 4 * esize
            plan = [("forward", fwd, fwd_in, map_b + tok_b)]
            if dtype == torch.float32 or not args.quick:
                plan += [("backward", bwd, both_in, map_b + 2 * tok_b)]
            plan += [("fwd+bwd", both, both_in, 2 * map_b + 3 * tok_b)]
            if dtype == torch.float32 and not args.quick:
                plan += [("fwd+bwd deterministic", det, both_in, 2 * map_b + 3 * tok_b)]
            for label, fn, inputs, nbytes in plan:
                t_graph = graph_time_us(fn, inputs, args.calls, args.reps)
                t_eager = eager_time_us(fn, inputs, args.calls, max(3, args.reps // 4))
                variants.append((f"cuda {dtype_label} {label}", t_graph, t_eager, nbytes / t_graph / 1e3))

        def reference_step(t, g):
            t = t.detach().requires_grad_()
            render_reference(t, side, side).backward(g)

        ref_us = float("nan") if args.quick else eager_time_us(reference_step, list(zip(sets, gouts))[:2], 1, 3)
        variants.append(("PyTorch reference fp32 fwd+bwd", ref_us, ref_us, float("nan")))
        rows.append((name, variants))
    return rows, checks


def run_for_profiler(args):
    """A few plain forward+backward calls per case, for an external profiler (ncu, nsys)."""
    from splat_cuda import op

    dtype = getattr(torch, args.profile_dtype)
    for name, batch, num, channels, side in GPU_CASES[: args.profile]:
        tokens = make_tokens(batch, num, channels, 0, "cuda", dtype)
        gout = torch.randn(batch, channels, side, side, device="cuda", dtype=dtype)
        for _ in range(3):
            masks = op.render_forward(tokens, side, side, 3.0, False, False)[1]
            op.render_backward(tokens, masks, gout, side, side, 3.0, False)
        torch.cuda.synchronize()
        print(f"profiled {name}")


def child_times(script: Path, env: dict, cases: list[int] | None, reps: int) -> dict[tuple[str, str], str]:
    """{(case, variant): GPU us/call} of `script --quick` (this benchmark, or a copy of it) run in a child process
    with the environment `env`."""
    with tempfile.TemporaryDirectory() as tmp:
        table = Path(tmp) / "table.md"
        command = [sys.executable, str(script), "--quick", "--reps", str(reps), "--markdown", str(table)]
        if cases:
            command += ["--cases", *map(str, cases)]
        subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL)
        times = {}
        for row in table.read_text().splitlines():
            cells = [c.strip() for c in row.strip("|").split("|")]
            if len(cells) == 6 and cells[1].startswith("cuda "):
                times[(cells[0], cells[1])] = cells[2]
        return times


def sweep_min_blocks(args) -> list[str]:
    """Time fp32 forward / backward / fwd+bwd for each `--sweep-min-blocks` setting (F,B = the blocks per SM the
    forward and backward kernels are compiled for: splat_cuda.compiler.MIN_BLOCKS), one child process each."""
    lines = ["| min blocks (fwd,bwd) | case | forward us | backward us | fwd+bwd us | bf16 fwd+bwd us |",
             "|---|---|---|---|---|---|"]
    for setting in args.sweep_min_blocks:
        with tempfile.TemporaryDirectory() as cache:
            env = dict(os.environ, SPLAT_CUDA_MIN_BLOCKS=setting, SPLAT_CUDA_CACHE=cache)
            times: dict[str, dict[str, str]] = {}
            for (case, label), us in child_times(Path(__file__), env, args.cases, args.reps).items():
                times.setdefault(case, {})[label] = us
        for case, t in times.items():
            lines.append(f"| {setting} | {case} | {t.get('cuda fp32 forward')} | {t.get('cuda fp32 backward')} | "
                         f"{t.get('cuda fp32 fwd+bwd')} | {t.get('cuda bf16 fwd+bwd')} |")
            print(lines[-1], flush=True)
    return lines


def run_cpu(args):
    torch.set_num_threads(args.threads)
    rows = []
    for name, batch, num, channels, side in CPU_CASES:
        tokens = make_tokens(batch, num, channels, 0, "cpu").requires_grad_()
        times = []
        for _ in range(args.cpu_reps):
            start = time.perf_counter()
            render_reference(tokens, side, side).square().mean().backward()
            times.append(time.perf_counter() - start)
            tokens.grad = None
        rows.append((name, statistics.median(times)))
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=50, help="calls per graph replay")
    parser.add_argument("--reps", type=int, default=40, help="timed replays (median)")
    parser.add_argument("--sets", type=int, default=4,
                        help="rotating input sets (at least; more where needed to exceed twice the L2 cache)")
    parser.add_argument("--cpu", action="store_true", help="time the CPU reference even if a GPU exists")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for --cpu")
    parser.add_argument("--cpu-reps", type=int, default=3)
    parser.add_argument("--markdown", type=Path, help="also write the tables as Markdown to this file")
    parser.add_argument("--cases", type=int, nargs="+", help="indices of the GPU cases to run (default: all)")
    parser.add_argument("--profile", type=int, default=0, metavar="K",
                        help="only run the first K GPU cases a few times, untimed, for a profiler")
    parser.add_argument("--profile-dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="token dtype of the --profile calls")
    parser.add_argument("--quick", action="store_true", help="fewer variants, no PyTorch reference timing")
    parser.add_argument("--sweep-min-blocks", nargs="+", metavar="F,B",
                        help="compare kernel register budgets (SPLAT_CUDA_MIN_BLOCKS settings), e.g. 3,3 4,3 4,2")
    args = parser.parse_args()
    if args.profile:
        run_for_profiler(args)
        return
    if args.sweep_min_blocks:
        emit(sweep_min_blocks(args), args.markdown)
        return
    lines = []
    if torch.cuda.is_available() and not args.cpu:
        rows, checks = run_gpu(args)
        lines.append(f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}")
        lines.append("")
        lines.append("| case | forward rel. err | gradient rel. err |")
        lines.append("|---|---|---|")
        lines += [f"| {n} | {f:.2e} | {g:.2e} |" for n, f, g in checks]
        lines.append("")
        lines.append("| case | variant | GPU us/call (graph) | us/call (eager) | GB/s | vs reference |")
        lines.append("|---|---|---|---|---|---|")
        for name, variants in rows:
            ref_us = variants[-1][1]
            for label, t_graph, t_eager, bw in variants:
                bw_text = "" if bw != bw else f"{bw:.0f}"
                ratio = "" if ref_us != ref_us else f"{ref_us / t_graph:.0f}x"
                lines.append(f"| {name} | {label} | {t_graph:.1f} | {t_eager:.1f} | {bw_text} | {ratio} |")
            if name in RELEASED_MS:
                fwd_ms, bwd_ms = RELEASED_MS[name]
                both = next(t for lab, t, _, _ in variants if lab == "cuda fp32 fwd+bwd")
                lines.append(f"| {name} | released kernel (quoted) fwd {fwd_ms} ms + bwd {bwd_ms} ms | "
                             f"{(fwd_ms + bwd_ms) * 1e3:.0f} | | | ours {((fwd_ms + bwd_ms) * 1e3) / both:.0f}x faster |")
                lines.append(f"| {name} | dense formula (quoted) | {DENSE_FORMULA_MS[name] * 1e3:.0f} | | | "
                             f"ours {DENSE_FORMULA_MS[name] * 1e3 / both:.0f}x faster |")
    else:
        rows = run_cpu(args)
        lines.append(f"CPU reference forward+backward, {args.threads} threads, torch {torch.__version__}")
        lines.append("")
        lines.append("| case | seconds (median) |")
        lines.append("|---|---|")
        lines += [f"| {name} | {sec:.2f} |" for name, sec in rows]
    emit(lines, args.markdown)


def emit(lines: list[str], markdown: Path | None) -> None:
    """Print the table lines, and write them to `markdown` too if given."""
    text = "\n".join(lines)
    print(text)
    if markdown:
        markdown.write_text(text + "\n")


if __name__ == "__main__":
    main()
