"""RobustDet (Dong, Wei, Lin, ECCV 2022) on the project's SSD-VGG: adversarially-aware convolutions whose
kernels are mixed per image by an Adversarial Image Discriminator, optionally with CFR (RobustDet*).

ALGORITHMS.md 1.2-1.5. :func:`robustdet_from_ssd` turns an :class:`~advdet.models.ssd_vgg.SSDVGG` into a
:class:`RobustSSD`:

- every convolution of ``vgg``, ``extras``, ``loc`` and ``conf`` becomes a
  :class:`~advdet.models.dynamic_conv.DynamicConv2d` with K = 4 kernels, each a copy of the clean
  kernel (so a fresh RobustSSD computes exactly what the SSD computes, whatever ``pi``); L2Norm, ReLUs and
  pools are unchanged; the list indices are kept (conv4_3 is still ``vgg[21]``);
- one ``pi = AID(x)`` (B, K) per image is shared by all layers (the reference's ``multi_fc=False``; the
  per-layer ``multi_fc=True`` option is not implemented);
- the AID sees the same normalised tensor as the detector and is inside the graph of ``dense``,
  ``predict`` and ``loss``, so every attack on a RobustSSD is adaptive;
- ``cfr=True`` wraps conv4_3 with CFR (:mod:`advdet.models.cfr`).

:func:`robustdet_loss` computes the training objective of eq. 5 on a clean and an adversarial batch.
"""

from __future__ import annotations

import copy
import logging
import os
from typing import Literal

import torch
from torch import nn

from advdet.models.aid import aid_cross_entropy, build_aid
from advdet.models.box_ops import cxcywh_to_xyxy, ssd_decode
from advdet.models.cfr import CFR, cfr_kld, cfr_recon_loss
from advdet.models.detector import Detector, DenseOutput, check_finite
from advdet.models.dynamic_conv import DynamicConv2d
from advdet.models.ssd_vgg import CONV4_3_INDEX, SSDVGG, SSDVGGNet, ssd_vgg_small
from advdet.models.weights import load_weights, read_state_dict

log = logging.getLogger(__name__)

# eq. 5 weights (paper Sec. 5.1; the reference code uses the same, with the CFR terms divided by 255)
BETA, A_AID, B_RE, C_KLD = 0.75, 3.0, 0.16, 5.0


def _dynamic_list(layers: nn.ModuleList, K: int) -> nn.ModuleList:
    return nn.ModuleList(DynamicConv2d.from_conv(m, K) if isinstance(m, nn.Conv2d) else copy.deepcopy(m)
                         for m in layers)


class RobustSSDNet(nn.Module):
    """The raw RobustDet network on normalised input.

    ``forward(x_norm, pi=None) -> (loc (B, P, 4), conf (B, P, C+1))`` like :class:`SSDVGGNet`;
    ``run(x_norm, pi=None, decode=False, stats=False) -> dict`` also returns ``pi`` and, with CFR, ``mu``,
    ``logvar``, ``z`` and (``decode=True``) the reconstruction ``recon`` (B, 3, S, S) in normalised pixel
    units. ``pi=None`` computes ``pi = aid(x_norm)``.
    """

    def __init__(self, net: SSDVGGNet, *, K: int, aid: nn.Module, cfr: bool, input_size: int):
        super().__init__()
        self.num_classes = net.num_classes
        self.K = K
        self.source_channels = list(net.source_channels)
        self.vgg = _dynamic_list(net.vgg, K)
        self.l2norm = copy.deepcopy(net.l2norm)
        self.extras = _dynamic_list(net.extras, K)
        self.loc = _dynamic_list(net.loc, K)
        self.conf = _dynamic_list(net.conf, K)
        self.aid = aid
        self.cfr = CFR(self.vgg[CONV4_3_INDEX], input_size) if cfr else None

    def run(self, x: torch.Tensor, pi: torch.Tensor | None = None, *, decode: bool = False,
            stats: bool = False) -> dict[str, torch.Tensor]:
        if pi is None:
            pi = self.aid(x)
        out: dict[str, torch.Tensor] = {"pi": pi}
        srcs = []
        h = x
        for i, layer in enumerate(self.vgg):
            if i == CONV4_3_INDEX and self.cfr is not None:
                mu = layer(h, pi)
                if self.training or stats or decode:
                    logvar = self.cfr.logvar(h, pi)
                    z = self.cfr.sample(mu, logvar) if self.training else mu
                    out.update(mu=mu, logvar=logvar, z=z)
                else:
                    z = mu
                if decode:
                    out["recon"] = self.cfr.decoder(z)
                h = z
            elif isinstance(layer, DynamicConv2d):
                h = layer(h, pi)
            else:
                h = layer(h)
            if i == CONV4_3_INDEX + 1:
                srcs.append(self.l2norm(h))
        srcs.append(h)
        for i in range(0, len(self.extras), 2):
            h = torch.relu(self.extras[i](h, pi))
            h = torch.relu(self.extras[i + 1](h, pi))
            srcs.append(h)
        b = x.shape[0]
        out["loc"] = torch.cat([l(s, pi).permute(0, 2, 3, 1).reshape(b, -1, 4) for s, l in zip(srcs, self.loc)], 1)
        out["conf"] = torch.cat([c(s, pi).permute(0, 2, 3, 1).reshape(b, -1, self.num_classes + 1)
                                 for s, c in zip(srcs, self.conf)], 1)
        return out

    def forward(self, x: torch.Tensor, pi: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.run(x, pi)
        return out["loc"], out["conf"]


class RobustSSD(Detector):
    """RobustDet (RobustDet* with ``cfr=True``) behind the Detector contract; build with :func:`robustdet_from_ssd`.

    Same input, outputs, post-processing and multibox loss as :class:`SSDVGG` (family ``"robustdet"``).
    ``dense`` adds ``extra["pi"]`` (B, K). ``loss(x, targets)`` returns ``{"cls", "loc"}``, plus ``"re"``
    and ``"kld"`` when CFR is on and every target carries ``"clean_image"`` (3, S, S) in [0, 1] (the clean
    image the reconstruction must match). In train mode CFR samples z; in eval mode it uses mu.
    """

    family = "robustdet"

    def __init__(self, ssd: SSDVGG, *, K: int = 4, cfr: bool = False, aid: str | nn.Module = "small"):
        if not isinstance(ssd, SSDVGG):
            raise TypeError(f"RobustSSD is built from an SSDVGG, got {type(ssd).__name__}")
        net = RobustSSDNet(ssd.model, K=K, aid=build_aid(aid, K), cfr=cfr, input_size=ssd.input_size)
        super().__init__(net, ssd.num_classes, ssd.input_size)
        self.K = K
        self.min_sizes, self.max_sizes, self.width = ssd.min_sizes, ssd.max_sizes, ssd.width
        self.nms = ssd.nms
        self.neg_pos_ratio, self.iou_threshold = ssd.neg_pos_ratio, ssd.iou_threshold
        self.register_buffer("priors", ssd.priors.detach().clone(), persistent=False)
        self.register_buffer("mean", ssd.mean.detach().clone(), persistent=False)
        self.to(ssd.priors.device)

    # the SSD's normalisation, target encoding, multibox loss and post-processing, unchanged
    normalize = SSDVGG.normalize
    encode_targets = SSDVGG.encode_targets
    multibox_loss = SSDVGG.multibox_loss
    postprocess = SSDVGG.postprocess
    # ... and the SSD's capabilities (per-image multibox losses, prior matching, L2Norm pass-through)
    per_image_loss = SSDVGG.per_image_loss
    positive_prior_losses = SSDVGG.positive_prior_losses
    match_targets = SSDVGG.match_targets
    relevance_passthrough = SSDVGG.relevance_passthrough
    feature_layers = SSDVGG.feature_layers  # the same ReLUs of conv4_3 and conv7 in the dynamic-conv VGG

    def ssd_architecture(self) -> SSDVGG:
        """A fresh :class:`SSDVGG` (random weights) of the architecture this RobustSSD was built from, e.g. to
        read an SSD checkpoint before converting it."""
        return SSDVGG(self.num_classes, self.input_size, width=self.width, min_sizes=self.min_sizes,
                      max_sizes=self.max_sizes, nms=self.nms, neg_pos_ratio=self.neg_pos_ratio,
                      iou_threshold=self.iou_threshold)

    @property
    def has_cfr(self) -> bool:
        return self.model.cfr is not None

    def aid_probs(self, x: torch.Tensor) -> torch.Tensor:
        """The AID's kernel-mixing probabilities ``pi`` (B, K) for a [0, 1] batch (differentiable)."""
        self.check_input(x)
        return self.model.aid(self.normalize(x))

    def raw(self, x: torch.Tensor, pi: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(loc, conf) for a [0, 1] batch; ``pi`` overrides the AID's output."""
        self.check_input(x)
        return self.model(self.normalize(x), pi)

    def dense(self, x: torch.Tensor, pi: torch.Tensor | None = None) -> DenseOutput:
        self.check_input(x)
        out = self.model.run(self.normalize(x), pi)
        loc, conf = out["loc"], out["conf"]
        boxes = ssd_decode(loc, self.priors[None])
        anchors = cxcywh_to_xyxy(self.priors)[None].expand(x.shape[0], -1, -1)
        return DenseOutput(logits=conf, boxes=boxes, anchors=anchors, score_mode="softmax_bg",
                           box_deltas=loc, extra={"loc": loc, "pi": out["pi"]})

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> list[dict]:
        dense = self.dense(x)
        check_finite(self.family, logits=dense.logits)
        return self.postprocess(dense)

    def loss(self, x: torch.Tensor, targets: list[dict]) -> dict[str, torch.Tensor]:
        self.check_input(x)
        clean = _stack_clean(targets, self.input_size) if self.has_cfr else None
        if clean is not None:
            clean = clean.to(self.priors)
        out = self.model.run(self.normalize(x), decode=clean is not None, stats=clean is not None)
        losses = self.multibox_loss(out["loc"], out["conf"], targets)
        if clean is not None:
            losses["re"] = cfr_recon_loss(out["recon"], self.normalize(clean))
            losses["kld"] = cfr_kld(out["mu"], out["logvar"])
        return losses


def robustdet_from_ssd(ssd: SSDVGG, *, K: int = 4, cfr: bool = False,
                       aid: Literal["small", "resnet18"] | nn.Module = "small") -> RobustSSD:
    """RobustDet from a (clean, trained) SSD: every conv's kernel and bias copied into all K slots.

    The SSD is not modified. ``aid``: ``"small"`` (zoo default, :func:`~advdet.models.aid.aid_small`),
    ``"resnet18"`` (the reference's, random init) or any module mapping the normalised batch to (B, K)
    probabilities.
    """
    return RobustSSD(ssd, K=K, cfr=cfr, aid=aid)


def require_robustdet(detector: nn.Module, what: str) -> RobustSSD:
    """``detector`` if it is a RobustSSD, else a TypeError saying that ``what`` needs one."""
    if not isinstance(detector, RobustSSD):
        raise TypeError(f"{what} needs a RobustSSD (build it with robustdet_from_ssd), got {type(detector).__name__}")
    return detector


def robustdet_for_training(det: nn.Module, init: str | os.PathLike | None, *, K: int, cfr: bool,
                           aid: Literal["small", "resnet18"] | nn.Module, seed: int, method: str) -> RobustSSD:
    """The RobustSSD that a RobustDet method trains, from ``det`` and the weights file ``init``.

    ``det`` is an SSDVGG (``init`` loaded into it, then converted by :func:`robustdet_from_ssd`) or a
    RobustSSD (``init`` is then a RobustSSD checkpoint, loaded as is, or an SSD checkpoint of the same
    architecture, converted). New parameters (AID, CFR) are drawn after ``torch.manual_seed(seed)``.
    """
    if isinstance(det, RobustSSD):
        if det.has_cfr != cfr:
            raise ValueError(f"method {method!r} trains a RobustSSD {'with' if cfr else 'without'} CFR, but the "
                             f"model {'has' if det.has_cfr else 'has no'} CFR")
        if init is None:
            log.warning("RobustDet from random weights: the paper starts from a clean SSD (--init ssd_vgg)")
            return det
        if set(read_state_dict(init)) == set(det.state_dict()):
            load_weights(det, init)
            return det
        ssd = det.ssd_architecture()
        load_weights(ssd, init)
        torch.manual_seed(seed)
        return robustdet_from_ssd(ssd, K=det.K, cfr=cfr, aid=aid)
    if not isinstance(det, SSDVGG):
        raise TypeError(f"method {method!r} builds RobustDet from an SSD-VGG; got {type(det).__name__}")
    if init is not None:
        load_weights(det, init)
    else:
        log.warning("RobustDet from a random SSD: the paper starts from a clean SSD (--init ssd_vgg)")
    torch.manual_seed(seed)
    return robustdet_from_ssd(det, K=K, cfr=cfr, aid=aid)


def robustdet_small(*, num_classes: int, input_size: int = 256, K: int = 4, cfr: bool = False,
                    aid: Literal["small", "resnet18"] = "small") -> RobustSSD:
    """The zoo architecture: RobustDet on :func:`~advdet.models.ssd_vgg.ssd_vgg_small` (random init)."""
    return robustdet_from_ssd(ssd_vgg_small(num_classes=num_classes, input_size=input_size), K=K, cfr=cfr, aid=aid)


def _stack_clean(targets: list[dict], size: int) -> torch.Tensor | None:
    if not targets or not all(isinstance(t, dict) and "clean_image" in t for t in targets):
        return None
    return torch.stack([t["clean_image"].reshape(3, size, size) for t in targets])


def robustdet_loss(model: RobustSSD, x_clean: torch.Tensor, t_clean: list[dict], x_adv: torch.Tensor,
                   t_adv: list[dict], *, triplet: Literal["code", "paper"] = "code",
                   triplet_reduction: Literal["mean", "sum"] = "mean", margin: float = 0.6,
                   beta: float = BETA, a: float = A_AID, b: float = B_RE, c: float = C_KLD,
                   cfr_divisor: float = 1.0, x_adv_clean: torch.Tensor | None = None, adc: bool = False,
                   aid_ce: float = 0.0, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """The RobustDet objective (eq. 5) on a clean and an adversarial batch (ALGORITHMS.md 1.5, one update).

    ``L = beta * (L_det + a * L_aid) + (b * L_re + c * L_kld) / cfr_divisor``, with

    - ``pi = AID([x_clean; x_adv])`` and one detector forward of the concatenated batch with that ``pi``;
    - ``L_det = L_cls + L_loc``, the multibox loss over all images (N = positives of the whole batch);
    - ``L_aid``: the triplet loss on ``pi`` with labels clean = 0, adversarial = 1
      (:func:`advdet.models.aid_triplet.aid_triplet_loss`, ``triplet="code"`` reference form by default,
      ``"paper"`` for eq. 2 with the JS divergence);
    - with CFR: ``L_re`` = MSE between the reconstructions of all images and their clean images (for the
      adversarial half: ``x_adv_clean``, else ``t_adv[i]["clean_image"]``), in normalised pixel units;
      ``L_kld`` from mu / logvar of conv4_3.

    Defaults are the paper's (beta 0.75, a 3, b 0.16, c 5, ``cfr_divisor=1``); the reference code divides
    the CFR terms by 255 (``cfr_divisor=255``). Note that in pixel units L_re is in the thousands at
    initialisation, so with the paper's weights it dominates L_det; the reference's /255 keeps it O(1).
    ``adc=True`` adds the reference's extra branch: the clean images forwarded again with the detached
    ``pi`` of the adversarial images (pair i <-> i, needs equal batch sizes), with the clean targets, in the
    same multibox loss. The model's train/eval mode is left to the caller (the reference trains in train mode).
    ``aid_ce > 0`` (not in the paper; an advdet option, docs/robustdet.md) adds ``aid_ce * L_ce``, the
    cross-entropy of ``pi`` against kernel 0 for clean and kernel 1 for adversarial images: a supervised
    signal that gets the AID out of the collapsed start where the triplet loss has no gradient.

    Returns a dict with ``loss`` (the total, to backpropagate), ``det``, ``cls``, ``loc``, ``aid``,
    ``n_triplets``, ``pi`` (detached, (Bc + Ba, K)), with CFR ``re`` and ``kld``, with ``aid_ce`` ``ce``.
    """
    from advdet.models.aid_triplet import aid_triplet_loss

    if not isinstance(model, RobustSSD):
        raise TypeError(f"robustdet_loss needs a RobustSSD, got {type(model).__name__}")
    bc, ba = x_clean.shape[0], x_adv.shape[0]
    if len(t_clean) != bc or len(t_adv) != ba:
        raise ValueError(f"targets ({len(t_clean)}, {len(t_adv)}) do not match batch sizes ({bc}, {ba})")
    x = torch.cat([x_clean, x_adv])
    model.check_input(x)
    clean_target = None
    if model.has_cfr:
        src = x_adv_clean if x_adv_clean is not None else _stack_clean(t_adv, model.input_size)
        if src is None:
            raise ValueError("robustdet_loss with CFR needs the clean images of the adversarial batch "
                             "(x_adv_clean=... or t_adv[i]['clean_image'])")
        if src.shape != x_adv.shape:
            raise ValueError(f"x_adv_clean {tuple(src.shape)} does not match x_adv {tuple(x_adv.shape)}")
        clean_target = model.normalize(torch.cat([x_clean, src.to(x_clean)]))
    net: RobustSSDNet = model.model
    out = net.run(model.normalize(x), decode=clean_target is not None, stats=clean_target is not None)
    pi = out["pi"]
    labels = torch.cat([torch.zeros(bc, dtype=torch.long), torch.ones(ba, dtype=torch.long)])
    l_aid, triplets = aid_triplet_loss(pi, labels, form=triplet, margin=margin, reduction=triplet_reduction,
                                       generator=generator)
    loc, conf, targets = out["loc"], out["conf"], list(t_clean) + list(t_adv)
    if adc:
        if ba != bc:
            raise ValueError(f"adc=True pairs clean image i with adversarial image i; got {bc} clean, {ba} adv")
        loc2, conf2 = net(model.normalize(x_clean), pi[bc:].detach())
        loc, conf, targets = torch.cat([loc, loc2]), torch.cat([conf, conf2]), targets + list(t_clean)
    det = model.multibox_loss(loc, conf, targets)
    l_det = det["cls"] + det["loc"]
    total = beta * (l_det + a * l_aid)
    result = {"det": l_det, "cls": det["cls"], "loc": det["loc"], "aid": l_aid,
              "n_triplets": torch.tensor(len(triplets)), "pi": pi.detach()}
    if aid_ce > 0:
        l_ce = aid_cross_entropy(pi, labels)
        total = total + aid_ce * l_ce
        result["ce"] = l_ce
    if clean_target is not None:
        l_re = cfr_recon_loss(out["recon"], clean_target)
        l_kld = cfr_kld(out["mu"], out["logvar"])
        total = total + (b * l_re + c * l_kld) / cfr_divisor
        result.update(re=l_re, kld=l_kld)
    result["loss"] = total
    return result
