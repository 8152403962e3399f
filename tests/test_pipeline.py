"""The whole suite end to end at the CI size (configs/pipeline_tiny.yaml, about a minute on 2 CPU cores): the
report exists, its JSON holds every metric with a finite value, the page references only files that exist, a
rerun skips every stage; plus the pipeline's input errors and the report's line plot."""
from __future__ import annotations

import json
import math
import re
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from generator.pipeline import (STAGES, PipelineError, load_pipeline_config, read_stage_marker, resolve_data_dir,
                                run_pipeline, RunPaths)
from generator.report import METRIC_KEYS, line_plot

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "pipeline_tiny.yaml"
DEFAULT = REPO / "configs" / "pipeline_fashion.yaml"


def _data_dir() -> Path:
    try:
        return resolve_data_dir(None, load_pipeline_config(TINY))
    except PipelineError as error:
        pytest.skip(f"Fashion-MNIST is not installed: {error}")


def _inception_available() -> bool:
    from eval.inception import resolve_weights_path

    try:
        resolve_weights_path()
    except FileNotFoundError:
        return False
    return True


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    output = tmp_path_factory.mktemp("pipeline") / "run"
    config = load_pipeline_config(TINY)
    summary = run_pipeline(config, output, _data_dir(), device="cpu")
    return output, config, summary


def test_end_to_end_report(tiny_run):
    output, _, summary = tiny_run
    assert [name for name in summary] == [stage.name for stage in STAGES]
    assert not any(entry["skipped"] for entry in summary.values())
    report = output / "report"
    result = json.loads((report / "metrics.json").read_text())
    expected = set(METRIC_KEYS)
    if not _inception_available():   # FID and friends must then be reported unavailable, never made up
        inception_keys = {"fid", "sfid", "precision", "recall"}
        assert inception_keys <= set(result["unavailable"])
        expected -= inception_keys
    missing = expected - set(result["metrics"])
    assert not missing, f"metrics.json lacks {missing}"
    for key in expected:
        assert isinstance(result["metrics"][key], float) and math.isfinite(result["metrics"][key]), key
    assert 0.0 <= result["metrics"]["ssim"] <= 1.0 and result["metrics"]["psnr"] > 5.0
    assert set(result["stage_seconds"]) == {s.name for s in STAGES} - {"report"}
    assert len(result["class_names"]) == 10

    page = (report / "index.html").read_text()
    references = re.findall(r'(?:src|href)="([^"]+)"', page)
    assert sum(r.endswith(".png") for r in references) >= 10 + 10 + 3   # samples, reconstructions, curves
    for reference in references:
        assert "://" not in reference and not reference.startswith("/"), f"not self-contained: {reference}"
        assert (report / reference).is_file(), f"index.html references a missing file: {reference}"
    for label, name in enumerate(result["class_names"]):
        assert f"{label}: {name}" in page


def test_rerun_skips_finished_stages(tiny_run):
    output, config, _ = tiny_run
    started = time.perf_counter()
    summary = run_pipeline(config, output, _data_dir(), device="cpu")
    assert all(entry["skipped"] for entry in summary.values())
    assert time.perf_counter() - started < 10


def test_unfinished_stage_is_redone_and_changed_config_refused(tiny_run, tmp_path):
    output, config, _ = tiny_run
    paths = RunPaths(output)
    (paths.stage("report") / "stage.json").unlink()
    (paths.report / "index.html").unlink()
    summary = run_pipeline(config, output, _data_dir(), device="cpu")
    assert not summary["report"]["skipped"] and summary["evaluate"]["skipped"]
    assert (paths.report / "index.html").is_file() and read_stage_marker(paths, "report") is not None

    data = yaml.safe_load(TINY.read_text())
    data["sample"]["per_class"] = 4
    changed = tmp_path / "changed.yaml"
    changed.write_text(yaml.safe_dump(data))
    with pytest.raises(PipelineError, match="another config"):
        run_pipeline(load_pipeline_config(changed), output, _data_dir(), device="cpu")


def test_default_config_is_consistent():
    config = load_pipeline_config(DEFAULT)
    assert config.tokenizer_model.tile_size == 32 and config.sample.per_class * 10 >= 300


def test_default_texture_model_can_tell_its_tokens_apart():
    """The texture model has no positional embedding: a token's layout is all that tells it apart from the other
    tokens, so the noise put on the layout in training must stay well below the distance between the centres of
    neighbouring smallest regions (2 min_size / (tile - 1) in [-1, 1] coordinates, 0.26 here). The paper's 0.5
    made every sample a spatially mixed texture (FID 188, recall 0.003), with real layouts as well."""
    config = load_pipeline_config(DEFAULT)
    model = config.tokenizer_model
    spacing = 2 * model.partition_min_size / (model.tile_size - 1)
    assert not config.texture.model.pos_embed
    assert config.texture.flow.layout_noise_std <= spacing / 4


def test_missing_dataset_folder_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.delenv("FASHION_MNIST_DIR", raising=False)
    config = load_pipeline_config(TINY)
    with pytest.raises(PipelineError, match="(?s)Fashion-MNIST not found.*t10k-labels-idx1-ubyte.gz.*--data"):
        resolve_data_dir(str(tmp_path), config)
    monkeypatch.setenv("FASHION_MNIST_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(PipelineError, match=r"nowhere \(\$FASHION_MNIST_DIR\)"):
        resolve_data_dir(None, config)


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["texture"]["model"].update(in_channels=12), "texture.model.in_channels 12 != 13"),
    (lambda d: d["layout"]["model"].update(num_tokens=32), "layout.model.num_tokens 32 != tokenizer_model"),
    (lambda d: d["tokenizer"]["data"].update(image_size=64), "image_size 64 != the tokenizer's tile 32"),
    (lambda d: d["sample"].update(colour="red"), r"unknown key\(s\) \['colour'\]"),
    (lambda d: d["sample"].update(grid_per_class=99), "grid_per_class <= per_class"),
])
def test_bad_config_is_a_clear_error(tmp_path, edit, message):
    data = yaml.safe_load(TINY.read_text())
    edit(data)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(PipelineError, match=message):
        load_pipeline_config(path)
    with pytest.raises(PipelineError, match="not found"):
        load_pipeline_config(tmp_path / "absent.yaml")


def test_line_plot_draws_each_series_and_survives_bad_values():
    image = line_plot({"a": ([0, 1, 2], [1.0, 0.5, 0.1]), "b": ([0, 2], [float("nan"), 0.3])}, "t", log_y=True)
    assert image.shape == (260, 440, 3) and image.dtype == np.uint8
    colours = {tuple(c) for c in image.reshape(-1, 3)}
    assert (31, 119, 180) in colours and (214, 39, 40) in colours   # both series drawn
    empty = line_plot({"a": ([], [])}, "nothing")
    assert {tuple(c) for c in empty.reshape(-1, 3)} != {(255, 255, 255)}
