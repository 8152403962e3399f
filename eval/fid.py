"""Command line: ADM-protocol metrics of generated samples, or rFID/PSNR/SSIM/LPIPS of reconstructions.

    python eval/fid.py GENERATED REFERENCE [--out results/run] [--kid] [--layouts GEN_LAYOUTS REAL_LAYOUTS]
    python eval/fid.py --rfid RECONSTRUCTIONS ORIGINALS [--lpips-vgg vgg16.pth]

GENERATED: a folder, a glob or an ``.npz`` (``arr_0`` NHWC); REFERENCE: a folder, a glob, an images ``.npz`` or
an ADM reference batch (``mu``, ``sigma``, ``mu_s``, ``sigma_s``, optionally ``arr_0``). See eval/README.md.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eval.evaluate import evaluate_reconstructions, evaluate_samples  # noqa: E402
from eval.images import VALUE_RANGES, InputError  # noqa: E402
from eval.inception import InceptionFeatureExtractor  # noqa: E402
from eval.report import write_reports  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("generated", help="generated samples (or reconstructions with --rfid)")
    parser.add_argument("reference", help="reference set or statistics (or originals with --rfid)")
    parser.add_argument("--rfid", action="store_true", help="reconstruction mode: pair images by file name")
    parser.add_argument("--inception-weights", help="TF-Inception weights file (see eval/README.md)")
    parser.add_argument("--lpips-vgg", help="torchvision VGG16 state dict, enables LPIPS in --rfid mode")
    parser.add_argument("--kid", action="store_true", help="also compute KID (needs reference images)")
    parser.add_argument("--layouts", nargs=2, metavar=("GEN_LAYOUTS", "REAL_LAYOUTS"),
                        help="also the layout Frechet distance (pooled, class mean) and exact fraction: the "
                             "layouts.npz of generator/sample.py and real layouts (npz: geometry, labels)")
    parser.add_argument("--sample-range", choices=sorted(VALUE_RANGES),
                        help="value range of float .npz samples (default: inferred, see README)")
    parser.add_argument("--device", default="cuda" if _cuda_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--workers", type=int, default=4, help="image decoding processes")
    parser.add_argument("--cache-dir", default=str(Path.home() / ".cache" / "gpstoken" / "inception"),
                        help="cache of reference statistics ('' disables)")
    parser.add_argument("--distributed", action="store_true", help="shard over processes of `accelerate launch`")
    parser.add_argument("--out", default="fid_report", help="report path stem: writes STEM.json and STEM.md")
    parser.add_argument("--append-to", help="Markdown results file to append the table to")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def _cuda_available() -> bool:
    import torch
    return torch.cuda.is_available()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.layouts and args.rfid:
        parser.error("--layouts belongs to sample evaluation, not --rfid")
    if args.layouts:  # first: seconds, where a bad file should not wait for the Inception pass
        from eval.layout import layout_metrics

        try:
            layouts = layout_metrics(*args.layouts)
        except (ValueError, FileNotFoundError) as error:
            print(f"error: --layouts: {error}", file=sys.stderr)
            return 2
    common = dict(batch_size=args.batch_size, num_workers=args.workers, device=args.device,
                  cache_dir=args.cache_dir or None, value_range=args.sample_range, progress=not args.quiet,
                  distributed=args.distributed)
    try:
        extractor = InceptionFeatureExtractor(args.inception_weights)
        if args.rfid:
            result = evaluate_reconstructions(args.generated, args.reference, extractor=extractor,
                                              lpips_vgg=args.lpips_vgg, **common)
        else:
            result = evaluate_samples(args.generated, args.reference, extractor=extractor, kid=args.kid, **common)
    except (InputError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.layouts:
        result["metrics"].update(layouts["metrics"])
        result["unavailable"].update(layouts["unavailable"])
        result["layouts"] = {"generated": args.layouts[0], "real": args.layouts[1], **layouts["report"]}
    json_path, markdown_path = write_reports(result, args.out, args.append_to)
    print(markdown_path.read_text())
    print(json.dumps(result["metrics"]))
    print(f"wrote {json_path} and {markdown_path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
