"""The example images of a transfer benchmark's report grids: per example image and row the clean and
adversarial image, every victim's detections and the relevance maps before / after on the surrogate."""

from __future__ import annotations

import logging
from typing import Sequence

import numpy as np
import torch

from advdet.attacks.quantize import to_uint8
from advdet.bench.failure_rates import threshold_detections
from advdet.bench.loading import LoadedModel
from advdet.bench.transfer_rows import RowSpec
from advdet.data.letterbox import letterbox_params, reletterbox, unletterbox_boxes

log = logging.getLogger(__name__)


def to_hwc(t: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(t.detach().cpu().permute(1, 2, 0).numpy())


def clean_example_rows(ex_store: list[dict], ds, victims: Sequence[str], clean_ref: dict[str, list[dict]],
                       loaded: dict) -> None:
    """The example grid's clean row: the clean image at the reference size with every victim's clean boxes."""
    for ex in ex_store:
        item = ds[ex["index"]]
        u8 = to_hwc(to_uint8(item["image"]))
        p = item["letterbox"]
        entry = {"clean": u8, "adv": u8, "params": p, "preds": {}}
        for v in victims:
            d = clean_ref[v][ex["index"]]
            p_v = letterbox_params(p.orig_h, p.orig_w, loaded[v].input_size)
            entry["preds"][v] = {**d, "boxes": unletterbox_boxes(d["boxes"], p_v)}
        ex["rows"][0] = entry


def record_examples(ex_store: list[dict], ri: int, idx: list[int], clean_u8: torch.Tensor, adv_u8: torch.Tensor,
                    params: list, preds: dict[str, list[dict]], params_v: dict[str, list], victims: Sequence[str],
                    score_thresh: float) -> None:
    """Row ``ri`` of the example grids for the batch ``idx`` (images beyond the examples are ignored)."""
    n_examples = len(ex_store)
    for j, i in enumerate(idx):
        if i >= n_examples:
            continue
        entry = {"clean": to_hwc(clean_u8[j]), "adv": to_hwc(adv_u8[j]), "params": params[j], "preds": {}}
        for v in victims:
            d = threshold_detections(preds[v][j], score_thresh)
            d["boxes"] = unletterbox_boxes(d["boxes"], params_v[v][j])
            entry["preds"][v] = d
        ex_store[i]["rows"][ri] = entry


def add_relevance(ex_store: list[dict], rows: Sequence[RowSpec], loaded: dict, rel_model: LoadedModel | None,
                   dev) -> None:
    """Relevance maps (Multi-Node SGLRP, default top-20 cls nodes) of every example image of every row, on
    the row's detector surrogate (reference and classifier rows: the first detector surrogate)."""
    try:
        from advdet.relevance.sglrp import relevance_map
    except ImportError as err:  # pragma: no cover
        log.warning("relevance maps unavailable: %s", err)
        return
    for ex in ex_store:
        for ri, entry in ex["rows"].items():
            spec = rows[ri]
            lm = loaded.get(spec.surrogate) if spec.kind == "detector" else rel_model
            lm = getattr(lm, "members", [lm])[0]  # an ensemble: its first member's relevance
            if lm is None or lm.kind != "detector":
                continue
            try:
                imgs = [entry["clean"], entry["adv"]]
                x = torch.stack([torch.from_numpy(a).permute(2, 0, 1).float() / 255.0 for a in imgs])
                if x.shape[-1] != lm.input_size:
                    x, _ = reletterbox(to_uint8(x), [entry["params"]] * 2, lm.input_size)
                res = relevance_map(lm.model, x.to(dev))
                entry["relevance"] = {"model": lm.name, "before": res.map[0].detach().cpu().numpy(),
                                      "after": res.map[1].detach().cpu().numpy()}
            except Exception as err:  # relevance is an illustration; never fail the benchmark for it
                log.warning("relevance map of %s on %s failed: %s", spec.label, lm.name, err)
