"""A checkpoint of any supported kind (synthval's, the seed's, a bare state dict) rebuilt into a model that
predicts: the one road from a checkpoint URI to a detector in eval mode, with its label names.
"""

from __future__ import annotations

import logging
from typing import Any

from synthval.config import to_dict
from synthval.data.labels import LabelSpace
from synthval.detection.checkpoint import describe, load_checkpoint, model_config_from, model_state_of
from synthval.detection.model import build_model, load_model_state, num_classes_in_state
from synthval.errors import CheckpointError

log = logging.getLogger(__name__)


def load_model_for_inference(uri: str, device: Any) -> tuple[Any, Any, dict]:
    """Return (model in eval mode on `device`, its LabelSpace or None, the checkpoint's metadata).

    The label space is None for seed checkpoints, which carry no label names: their class k is the
    dataset's label id k, as the seed's GroceriesReal models were trained.
    """
    state = load_checkpoint(uri)
    weights = model_state_of(state, uri)
    info = describe(state, uri)
    config = model_config_from(info["model_config"], uri)
    num_classes = num_classes_in_state(weights)
    names = info["label_names"]
    if names is not None and len(names) + 1 != num_classes:
        raise CheckpointError(f"{uri}: {len(names)} label names but {num_classes - 1} classes in the weights")
    model = build_model(config, num_classes, load_backbone_weights=False)
    load_model_state(model, weights, uri)
    model.to(device).eval()
    space = None
    if names is not None:
        space = LabelSpace(tuple(names))
    metadata = dict(info["metadata"], model_config=to_dict(config), num_classes=num_classes)
    log.info("loaded %s: %s with %d classes (%s)", uri, config.name, num_classes - 1, metadata["source_format"])
    return model, space, metadata
