"""Evaluation reports: the result dictionary as JSON and as a Markdown table, optionally appended to a file."""
from __future__ import annotations

import json
import math
import os
from datetime import datetime, timezone
from pathlib import Path

METRIC_LABELS = {
    "fid": "FID", "sfid": "sFID", "precision": "Precision", "recall": "Recall",
    "inception_score": "Inception Score", "inception_score_std": "Inception Score (std over splits)",
    "kid": "KID", "kid_std": "KID (std over subsets)", "rfid": "rFID", "psnr": "PSNR (dB)", "ssim": "SSIM",
    "lpips": "LPIPS",
}


def _format(value) -> str:
    if isinstance(value, float):
        return "inf" if math.isinf(value) else f"{value:.4f}"
    return str(value)


def to_markdown(result: dict) -> str:
    """A self-describing Markdown block: inputs, image counts, weights hash, the metrics table, settings."""
    settings = result["settings"]
    lines = [
        f"### {result['mode'].capitalize()} metrics ({result.get('created', '')})",
        "",
        f"- generated: `{result['generated']}` ({result['num_generated']} images)",
        f"- reference: `{result['reference']}` ({result['num_reference'] or 'statistics only'} images)",
        f"- Inception weights: `{Path(settings['inception_weights']).name}` "
        f"(SHA-256 `{settings['inception_weights_sha256']}`)",
        "",
        "| metric | value |",
        "| --- | --- |",
    ]
    lines += [f"| {METRIC_LABELS.get(k, k)} | {_format(v)} |" for k, v in result["metrics"].items()]
    lines += [f"| {METRIC_LABELS.get(k, k)} | unavailable: {why} |" for k, why in result["unavailable"].items()]
    lines += ["", "Settings: " + ", ".join(f"{k}={v}" for k, v in settings.items()
                                          if k not in ("inception_weights", "inception_weights_sha256")), ""]
    return "\n".join(lines)


def write_reports(result: dict, output_stem: str | os.PathLike,
                  append_to: str | os.PathLike | None = None) -> tuple[Path, Path]:
    """Write ``<stem>.json`` and ``<stem>.md``; append the Markdown block to ``append_to`` when given."""
    result = {**result, "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    stem = Path(output_stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    json_path, markdown_path = stem.with_suffix(".json"), stem.with_suffix(".md")
    json_path.write_text(json.dumps(result, indent=2, allow_nan=True) + "\n")
    markdown = to_markdown(result)
    markdown_path.write_text(markdown)
    if append_to is not None:
        with open(append_to, "a") as handle:
            handle.write("\n" + markdown)
    return json_path, markdown_path
