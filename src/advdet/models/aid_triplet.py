"""The AID triplet loss of RobustDet (paper eq. 2, ALGORITHMS.md 1.3) with online random-hard-negative mining.

Embeddings are the AID's softmax vectors ``pi`` (N, K) of a batch of clean (label 0) and adversarial
(label 1) images. Triplets are mined online like the reference's ``OnlineTripletLoss`` with a
random-hard-negative selector:

1. for each label (in sorted order), every unordered pair ``(a, p)``, ``a < p``, of images with that label
   (``itertools.combinations`` order) is an anchor/positive pair;
2. for every negative ``n`` (other label) ``v_n = d(a, p) - d(a, n) + margin``; one ``n`` is drawn uniformly
   among those with ``v_n > 0``; pairs with none are skipped;
3. if the batch gives no triplet at all, one fallback triplet is used: the last (a, p) pair with the first
   negative of the last label processed. With no (a, p) pair or no negative at all the list stays empty.

Two loss forms (``form=``):

- ``"code"`` (default): the reference implementation. Mining distance ``pdist_js(p, q) =
  mean_k[p log(p/m) + q log(q/m)]``, m = (p + q) / 2 (that is (2/K) JS(p||q)); loss value
  ``mean over triplets of relu(||a-p||^2 - ||a-n||^2 + margin)`` with squared Euclidean distance on the
  softmax vectors; constant 0.1 (no gradient) when the triplet list is empty.
- ``"paper"``: eq. 2 as written: the Jensen-Shannon divergence ``JS(P||Q) = KL(P||M)/2 + KL(Q||M)/2``
  (natural log) both for mining and for the loss ``[JS(a||p) - JS(a||n) + margin]_+``; 0 (with a graph)
  when there is no triplet. Eq. 2 sums over triplets; ``reduction="mean"`` (default, like the code, so the
  weight a = 3 of eq. 5 means the same thing for both forms) or ``"sum"`` (eq. 2 literally).

Why ``"code"`` is the default: it is what trained the released RobustDet models (and so the paper's
numbers and its hyper-parameters a = 3, margin 0.6). Note that with K = 4 the code's mining distance is at
most ln(2)/2 ~= 0.35 < 0.6, so *every* negative is "hard" and mining reduces to a uniformly random
negative; the squared-L2 hinge (max distance 2 on the simplex) is what actually separates the classes.
In the paper form the JS divergence is at most ln 2 ~= 0.69, so the margin 0.6 is only met by nearly
disjoint distributions.

Logs use ``clamp_min(tiny)`` so that 0 * log 0 = 0 (the reference adds no epsilon and would give NaN).
Random choices use ``generator`` (a ``torch.Generator``), else the global RNG.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

TripletForm = Literal["code", "paper"]
MiningDistance = Literal["pdist_js", "js", "sqeuclidean"]

AID_MARGIN = 0.6
EMPTY_TRIPLET_LOSS = 0.1  # the reference's constant when no triplet exists


def _xlogy_ratio(p: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    tiny = torch.finfo(p.dtype).tiny
    return p * (p.clamp_min(tiny).log() - m.clamp_min(tiny).log())


def js_divergence(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Jensen-Shannon divergence (natural log) along the last dim: KL(p||m)/2 + KL(q||m)/2, m = (p+q)/2."""
    m = (p + q) / 2
    return 0.5 * (_xlogy_ratio(p, m).sum(-1) + _xlogy_ratio(q, m).sum(-1))


def pdist_js(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """The reference's mining distance ``mean_k[p log p - p log m + q log q - q log m]`` = (2/K) JS(p||q)."""
    m = (p + q) / 2
    return (_xlogy_ratio(p, m) + _xlogy_ratio(q, m)).mean(-1)


def pairwise_distance(probs: torch.Tensor, kind: MiningDistance = "pdist_js") -> torch.Tensor:
    """(N, N) matrix of ``kind`` distances between the rows of ``probs`` (N, K)."""
    a, b = probs[:, None, :], probs[None, :, :]
    if kind == "pdist_js":
        return pdist_js(a, b)
    if kind == "js":
        return js_divergence(a, b)
    if kind == "sqeuclidean":
        return (a - b).pow(2).sum(-1)
    raise ValueError(f"unknown distance {kind!r}; use 'pdist_js', 'js' or 'sqeuclidean'")


def mine_triplets(probs: torch.Tensor, labels, *, margin: float = AID_MARGIN,
                  distance: MiningDistance = "pdist_js", generator: torch.Generator | None = None,
                  fallback: bool = True) -> torch.Tensor:
    """Online random-hard-negative triplet mining (see module docstring).

    Args:
        probs: (N, K) embeddings (the AID softmax vectors); used detached.
        labels: (N,) ints (clean = 0, adversarial = 1), a tensor or a sequence.
        margin: the triplet margin (0.6).
        distance: mining distance (``"pdist_js"`` = the reference code's).
        generator: CPU ``torch.Generator`` for the random negative choice.
        fallback: add the reference's single fallback triplet when none is found.

    Returns:
        (T, 3) int64 CPU tensor of (anchor, positive, negative) indices, in mining order.
    """
    labels = torch.as_tensor(labels).flatten().cpu()
    if probs.ndim != 2 or probs.shape[0] != labels.numel():
        raise ValueError(f"probs must be (N, K) with N = len(labels) = {labels.numel()}, got {tuple(probs.shape)}")
    d = pairwise_distance(probs.detach().float().cpu(), distance)
    triplets: list[torch.Tensor] = []
    last_pair: tuple[int, int] | None = None
    last_negs: torch.Tensor | None = None
    for lab in torch.unique(labels).tolist():  # sorted
        idx = torch.nonzero(labels == lab).squeeze(1)
        if idx.numel() < 2:
            continue
        negs = torch.nonzero(labels != lab).squeeze(1)
        pairs = torch.combinations(idx, 2)  # (P, 2), lexicographic like itertools.combinations
        last_pair = (int(pairs[-1, 0]), int(pairs[-1, 1]))
        last_negs = negs
        if negs.numel() == 0:
            continue
        a, p = pairs[:, 0], pairs[:, 1]
        v = d[a, p][:, None] - d[a[:, None], negs[None, :]] + margin  # (P, Nneg)
        hard = v > 0
        # uniform choice among the hard negatives: argmax of iid uniforms restricted to them
        u = torch.rand(v.shape, generator=generator).masked_fill(~hard, -1.0)
        pick = u.argmax(1)
        ok = hard.any(1)
        if ok.any():
            triplets.append(torch.stack([a[ok], p[ok], negs[pick[ok]]], 1))
    if triplets:
        return torch.cat(triplets)
    if fallback and last_pair is not None and last_negs is not None and last_negs.numel():
        return torch.tensor([[last_pair[0], last_pair[1], int(last_negs[0])]], dtype=torch.long)
    return torch.zeros(0, 3, dtype=torch.long)


def triplet_loss(probs: torch.Tensor, triplets: torch.Tensor, *, form: TripletForm = "code",
                 margin: float = AID_MARGIN, reduction: Literal["mean", "sum"] = "mean") -> torch.Tensor:
    """Loss value of given triplets (T, 3) on ``probs`` (N, K); see the module docstring for the forms."""
    if form not in ("code", "paper"):
        raise ValueError(f"unknown triplet form {form!r}; use 'code' or 'paper'")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if triplets.numel() == 0:
        if form == "code":
            return torch.tensor(EMPTY_TRIPLET_LOSS, device=probs.device, dtype=probs.dtype)
        return probs.sum() * 0.0
    t = triplets.to(probs.device)
    a, p, n = probs[t[:, 0]], probs[t[:, 1]], probs[t[:, 2]]
    if form == "code":
        losses = F.relu((a - p).pow(2).sum(1) - (a - n).pow(2).sum(1) + margin)
    else:
        losses = F.relu(js_divergence(a, p) - js_divergence(a, n) + margin)
    return losses.mean() if reduction == "mean" else losses.sum()


def aid_triplet_loss(probs: torch.Tensor, labels, *, form: TripletForm = "code", margin: float = AID_MARGIN,
                     reduction: Literal["mean", "sum"] = "mean", generator: torch.Generator | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Mine triplets and score them: returns ``(loss, triplets)``.

    ``form="code"`` mines with ``pdist_js`` and scores with squared L2 (the reference); ``form="paper"``
    mines and scores with the JS divergence (eq. 2). Both use the reference's fallback triplet.
    """
    distance: MiningDistance = "pdist_js" if form == "code" else "js"
    triplets = mine_triplets(probs, labels, margin=margin, distance=distance, generator=generator)
    return triplet_loss(probs, triplets, form=form, margin=margin, reduction=reduction), triplets
