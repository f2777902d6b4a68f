"""TensorBoard: the run report's pictures as images, and writing on the main process only, to a local folder
or any fsspec URI (gs://...).

tensorboard's own file layer does hand gs:// paths to fsspec, but it writes an event file by opening
it in append mode for every chunk, and GCS has no append: gcsfs warns and overwrites, so each flush
would replace the event file with its last chunk. A remote log dir is therefore written locally and
uploaded, each event file as one whole object, on every flush and on close: TensorBoard pointed at the
bucket sees complete files that grow at each epoch.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Mapping
from typing import Any

import numpy as np

from synthval.detection import distributed
from synthval.io import storage
from synthval.render import plots
from synthval.render.report import draw_outcome
from synthval.scoring.analysis import DEFAULT_SCORE_THRESHOLD, RunAnalysis, RunInputs
from synthval.scoring.coco_eval import Matches
from synthval.scoring.outcomes import image_outcomes

log = logging.getLogger(__name__)


class NullWriter:
    """Accepts every SummaryWriter call and does nothing (non-main processes, or no log dir)."""

    def __getattr__(self, name: str) -> Any:
        return lambda *args, **kwargs: None


def _syncing_writer_class() -> type:
    from torch.utils.tensorboard import SummaryWriter

    class SyncingSummaryWriter(SummaryWriter):
        """A SummaryWriter on a local staging folder, mirrored to `remote_uri` on flush and close."""

        def __init__(self, remote_uri: str, **kwargs: Any) -> None:
            self.remote_uri = remote_uri
            self.staging = tempfile.mkdtemp(prefix="synthval-tb-")
            super().__init__(log_dir=self.staging, **kwargs)

        def sync(self) -> None:
            for folder, _, files in os.walk(self.staging):
                for name in files:
                    local = os.path.join(folder, name)
                    rel = os.path.relpath(local, self.staging).replace(os.sep, "/")
                    fs, path = storage.filesystem(storage.join_uri(self.remote_uri, rel))
                    fs.put_file(local, path)

        def flush(self) -> None:
            super().flush()
            self.sync()

        def close(self) -> None:
            super().close()
            self.sync()
            shutil.rmtree(self.staging, ignore_errors=True)

    return SyncingSummaryWriter


def open_summary_writer(log_dir_uri: str | None) -> Any:
    """Return a SummaryWriter on `log_dir_uri` on the main process, else a NullWriter.

    Call `flush()` at each epoch's end and `close()` at the end: for a remote URI that is when the
    event files are uploaded.
    """
    if not log_dir_uri or not distributed.is_main_process():
        return NullWriter()
    if storage.is_local(log_dir_uri):
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(log_dir=storage.local_path(log_dir_uri))
    else:
        writer = _syncing_writer_class()(log_dir_uri)
    log.info("TensorBoard events go to %s", log_dir_uri)
    return writer


def add_scalars(writer: Any, prefix: str, values: dict[str, Any], step: int) -> None:
    """Write each numeric value as its own scalar `prefix/name` (None and non-numbers are skipped)."""
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        writer.add_scalar(f"{prefix}/{name}", float(value), step)


def tensorboard_images(matches: Matches, metrics: Mapping[str, Any], score_threshold: float = DEFAULT_SCORE_THRESHOLD,
                       num_images: int = 4) -> dict[str, np.ndarray]:
    """The run report's pictures as HWC uint8 RGB arrays by TensorBoard tag, for
    `writer.add_image(tag, array, step, dataformats="HWC")` during training and evaluation.

    Tags: eval/per_class_AP, eval/pr_curves, eval/confusion (only when classes are confused), and
    eval/worst/<i>, eval/best/<i> (images with TP/FP/MISS drawn). `matches` and `metrics` are a
    `CocoEvaluator`'s `matches` and result dict: the pictures show the matches that were scored.
    """
    images = {"eval/per_class_AP": plots.figure_array(plots.per_class_ap_figure(metrics)),
              "eval/pr_curves": plots.figure_array(plots.pr_curves_figure(metrics))}
    outcomes, confusion = image_outcomes(matches, score_threshold)
    if confusion:
        images["eval/confusion"] = plots.figure_array(plots.confusion_figure(confusion))
    holder = RunAnalysis(RunInputs("", dict(metrics), matches.index, "", None, None, None), score_threshold, None,
                         matches, outcomes, confusion)
    worst = holder.worst(num_images)
    for name, chosen in (("worst", worst), ("best", holder.best(num_images, exclude=worst))):
        for i, outcome in enumerate(chosen):
            try:
                images[f"eval/{name}/{i}"] = plots.image_array(draw_outcome(outcome, score_threshold))
            except Exception as exc:  # pictures are a courtesy: one unreadable image must not fail a step
                log.warning("TensorBoard image %s skipped: %s", outcome.path, exc)
    return images

