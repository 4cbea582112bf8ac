"""`advdet analyze relevance-similarity` (issue 24, item 3): the correlations against independent
implementations and hand-computed cases, the unletterboxing onto the original grid, the input-gradient
baseline against its closed form on a hand-built detector, the matrices of tiny random models (symmetric,
diagonal exactly 1, values in [-1, 1]), and the CLI writing its PNGs and JSON."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from advdet.bench.relevance_similarity import (KINDS, cosine, gradient_map, map_similarity, pair_key, rankdata,
                                               run_relevance_similarity, similarity_matrices, spearman,
                                               to_image_grid)
from advdet.data.letterbox import letterbox_params
from advdet.relevance import NodeSelection, relevance_map
from test_robustness_bench import CELL, ToyDetector


def _write_coco(root, sizes=((40, 72), (56, 32), (64, 64))):
    """Small non-square images (H, W) with one box each, as a COCO-format folder."""
    (root / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    images, anns = [], []
    for i, (h, w) in enumerate(sizes):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / "images" / f"{i}.png")
        images.append({"id": i + 1, "file_name": f"{i}.png", "height": h, "width": w})
        anns.append({"id": i + 1, "image_id": i + 1, "category_id": 1, "iscrowd": 0, "bbox": [2, 2, 20, 16],
                     "area": 320})
    coco = {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]}
    (root / "instances.json").write_text(json.dumps(coco))
    return root


def test_spearman_matches_ranks_by_double_argsort_and_hand_cases():
    rng = np.random.default_rng(1)
    for _ in range(5):
        a, b = rng.normal(size=200), rng.normal(size=200) + 0.5 * rng.normal(size=200)
        b = b + 0.7 * a
        ra, rb = (np.argsort(np.argsort(v)).astype(np.float64) for v in (a, b))  # no ties: exact ranks
        expected = np.corrcoef(ra, rb)[0, 1]
        assert spearman(a, b) == pytest.approx(expected, abs=1e-12)
        assert cosine(a, b) == pytest.approx(a @ b / np.linalg.norm(a) / np.linalg.norm(b), abs=1e-12)
    # hand cases: one swapped pair of 4 -> 1 - 6 * 2 / (4 * 15) = 0.8; a monotone map -> 1; reversed -> -1
    assert spearman([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8, abs=1e-12)
    assert spearman([1.0, 2.0, 3.0], [0.1, 5.0, 7.0]) == pytest.approx(1.0)
    assert spearman([1.0, 2.0, 3.0], [3.0, 2.0, 1.0]) == pytest.approx(-1.0)
    # ties share their mean rank (scipy's default): ranks of [1, 2, 2, 3] are [1, 2.5, 2.5, 4]
    assert rankdata([1.0, 2.0, 2.0, 3.0]).tolist() == [1.0, 2.5, 2.5, 4.0]
    assert rankdata([[3.0, 3.0], [3.0, 0.0]]).tolist() == [3.0, 3.0, 3.0, 1.0]
    # [0, 0, 1] vs [1, 2, 3]: ranks [1.5, 1.5, 3] vs [1, 2, 3] -> Pearson by hand = sqrt(3) / 2
    assert spearman([0.0, 0.0, 1.0], [1.0, 2.0, 3.0]) == pytest.approx(np.sqrt(3) / 2, abs=1e-12)
    assert cosine([1.0, 0.0], [1.0, 1.0]) == pytest.approx(1 / np.sqrt(2))
    assert np.isnan(spearman([2.0, 2.0, 2.0], [1.0, 2.0, 3.0])) and np.isnan(cosine([0.0, 0.0], [1.0, 2.0]))
    with pytest.raises(ValueError, match="differ in size"):
        spearman([1.0, 2.0], [1.0, 2.0, 3.0])


def test_map_similarity_of_a_map_with_itself_is_exactly_one():
    m = np.random.default_rng(2).normal(size=(37, 23)) * 1e-9
    assert map_similarity(m, m.copy()) == {"spearman": 1.0, "cosine": 1.0}
    const = np.full((4, 4), 3.0)
    s = map_similarity(const, const.copy())
    assert np.isnan(s["spearman"]) and s["cosine"] == 1.0
    assert all(np.isnan(v) for v in map_similarity(np.zeros(5), np.zeros(5)).values())


def test_to_image_grid_drops_the_padding_and_restores_the_original_size():
    p = letterbox_params(40, 72, 64)  # content 36 x 64, padded 14 above and 14 below
    nh, nw = p.content_hw
    m = torch.full((64, 64), 5.0)
    m[p.pad_y:p.pad_y + nh, p.pad_x:p.pad_x + nw] = 1.0
    g = to_image_grid(m, p)
    assert g.shape == (40, 72) and np.allclose(g, 1.0)
    # a left-right ramp stays a ramp of the same range (bilinear upsampling)
    ramp = torch.arange(64, dtype=torch.float64).expand(64, 64).clone()
    g = to_image_grid(ramp, p)
    assert np.all(np.diff(g, axis=1) > 0) and np.allclose(g[0], g[-1])
    with pytest.raises(ValueError, match="does not fit"):
        to_image_grid(torch.zeros(32, 32), p)


def test_gradient_map_matches_the_closed_form_on_the_toy_detector():
    """ToyDetector: per 16 px cell z_1 = 20 (R - G) - 10, z_2 = -z_1 - 20 (mean colours of the cell). The
    node of the top candidate is its argmax logit, so ds/dR = +-20/256 and ds/dG = -+20/256 on that cell's
    pixels and 0 elsewhere: |.| summed over RGB is 40/256 there, the signed sum 0 everywhere."""
    det = ToyDetector().eval()
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    res = relevance_map(det, x, NodeSelection(m=1))
    g_abs = gradient_map(det, x, res.nodes, "abs")
    g_signed = gradient_map(det, x, res.nodes, "signed")
    assert g_abs.shape == (2, 64, 64)
    for b in range(2):
        (cand,) = res.nodes.candidates[b].tolist()
        r, c = divmod(cand, 64 // CELL)
        expected = torch.zeros(64, 64)
        expected[r * CELL:(r + 1) * CELL, c * CELL:(c + 1) * CELL] = 40.0 / CELL ** 2
        torch.testing.assert_close(g_abs[b], expected)
    torch.testing.assert_close(g_signed, torch.zeros_like(g_signed), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="abs' or 'signed"):
        gradient_map(det, x, res.nodes, "max")


def test_similarity_matrices_are_symmetric_means_over_defined_values():
    models = ["a", "b"]
    per = {"spearman": {pair_key("a", "a"): [1.0, 1.0], pair_key("a", "b"): [0.5, float("nan")],
                        pair_key("b", "b"): [1.0, float("nan")]}}
    m = similarity_matrices(models, per)
    assert m["spearman"] == [[1.0, 0.5], [0.5, 1.0]] and m["n"]["spearman"] == [[2, 1], [1, 1]]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from advdet.models.ssd_vgg import ssd_vgg_small
    from advdet.models.yolov3 import yolov3_small

    root = tmp_path_factory.mktemp("relsim")
    data = _write_coco(root / "coco")
    torch.manual_seed(0)
    dets = {"tiny_ssd": ssd_vgg_small(num_classes=2, input_size=64, width=0.125),
            "tiny_yolo": yolov3_small(num_classes=2, input_size=96, width=0.125, depth=0.34),
            "tiny_ssd_96": ssd_vgg_small(num_classes=2, input_size=96, width=0.125)}
    res = run_relevance_similarity(list(dets), data, root / "out", detectors=dets, limit=3, batch_size=2,
                                   device="cpu")
    return res, root / "out", dets


def test_matrices_of_tiny_models_are_symmetric_with_unit_diagonal(tiny_run):
    res, out, _ = tiny_run
    models = res["models"]
    assert res["images"] == 3 and res["image_sizes"] == [[40, 72], [56, 32], [64, 64]]
    sizes = {m: res["model_info"][m]["input_size"] for m in models}
    assert sizes == {"tiny_ssd": 64, "tiny_yolo": 96, "tiny_ssd_96": 96}
    for kind in KINDS:
        k = res["kinds"][kind]
        for metric in ("spearman", "cosine"):
            a = np.array(k[metric], dtype=np.float64)
            assert a.shape == (3, 3) and np.isfinite(a).all()
            assert np.array_equal(a, a.T)
            assert np.all(np.diag(a) == 1.0)
            assert np.all((a >= -1.0) & (a <= 1.0))
            per = k["per_image"][metric]
            assert len(per[pair_key("tiny_ssd", "tiny_yolo")]) == 3
            assert a[0, 1] == pytest.approx(np.mean(per[pair_key("tiny_ssd", "tiny_yolo")]))
            assert all(v == 1.0 for v in per[pair_key("tiny_yolo", "tiny_yolo")])
        assert not np.allclose(np.array(k["spearman"])[0, 1], 1.0)  # different models, different maps
    assert res["settings"]["gradient"] == "abs" and res["settings"]["nodes"]["m"] == 20
    assert all(len(res["model_info"][m]["nodes_per_image"]) == 3 for m in models)
    assert res["model_info"]["tiny_ssd"]["weights_sha256"] is None  # a module given in: no file
    data = json.loads((out / "relevance_similarity.json").read_text())
    assert data["kinds"]["sglrp"]["spearman"] == res["kinds"]["sglrp"]["spearman"]
    for kind in KINDS:
        assert (out / f"relevance_similarity_{kind}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_pair_value_equals_an_independent_recomputation(tiny_run):
    """The first image's SGLRP Spearman of (tiny_ssd at 64 px, tiny_yolo at 96 px), recomputed by hand:
    letterbox by the dataset at each size, map (one image per batch, the run had two), crop the content,
    resize to the original 40 x 72 (bilinear, antialiased where it shrinks), ranks
    with tied values given their mean rank (double argsort where there are no ties)."""
    import torch.nn.functional as F

    from advdet.bench.robustness_scoring import load_eval_dataset

    res, out, dets = tiny_run
    root = out.parent / "coco"
    maps = []
    for name in ("tiny_ssd", "tiny_yolo"):
        det = dets[name]
        item = load_eval_dataset(root, size=det.input_size)[0]
        m = relevance_map(det.eval(), item["image"][None]).map[0].detach().double()
        p = item["letterbox"]
        nh, nw = p.content_hw
        crop = m[p.pad_y:p.pad_y + nh, p.pad_x:p.pad_x + nw]
        shrink = nh > 40 or nw > 72  # tiny_yolo's 53 x 96 content shrinks: antialiased
        maps.append(F.interpolate(crop[None, None], size=(40, 72), mode="bilinear", align_corners=False,
                                  antialias=shrink)[0, 0].numpy().ravel())

    def ranks(v):
        if len(np.unique(v)) == v.size:
            return np.argsort(np.argsort(v)).astype(np.float64)
        sv = np.sort(v)
        return np.array([(np.searchsorted(sv, x, "left") + np.searchsorted(sv, x, "right") - 1) / 2 for x in v])

    expected = np.corrcoef(ranks(maps[0]), ranks(maps[1]))[0, 1]
    got = res["kinds"]["sglrp"]["per_image"]["spearman"][pair_key("tiny_ssd", "tiny_yolo")][0]
    assert got == pytest.approx(expected, abs=1e-4)  # float32 maps of a batch of 2 vs 1: a few ranks swap


def test_run_refuses_bad_model_lists(tmp_path):
    with pytest.raises(ValueError, match="at least 2 models"):
        run_relevance_similarity(["ssd_vgg"], "shapes-val", tmp_path)
    with pytest.raises(ValueError, match="listed twice"):
        run_relevance_similarity(["ssd_vgg", "ssd_vgg"], "shapes-val", tmp_path)
    with pytest.raises(ValueError, match="'abs' or 'signed'"):
        run_relevance_similarity(["ssd_vgg", "yolov3"], "shapes-val", tmp_path, gradient="max")
    with pytest.raises(KeyError, match="unknown zoo model 'nope'"):
        run_relevance_similarity(["nope", "ssd_vgg"], "shapes-val", tmp_path)


def test_cli_writes_png_and_json_and_names_an_unknown_model(tmp_path):
    from advdet.cli import app
    from advdet.models.ssd_vgg import ssd_vgg_small
    from advdet.models.weights import save_weights, sha256_file
    from advdet.models.yolov3 import yolov3_small

    data = _write_coco(tmp_path / "coco", sizes=((48, 80), (64, 40)))
    torch.manual_seed(0)
    ws, wy = tmp_path / "ssd.safetensors", tmp_path / "yolo.safetensors"
    save_weights(ssd_vgg_small(num_classes=8, input_size=256), ws, {})  # the zoo: 8 classes
    save_weights(yolov3_small(num_classes=8, input_size=256), wy, {})
    runner = CliRunner()
    out = tmp_path / "out"
    res = runner.invoke(app, ["analyze", "relevance-similarity", "--models", "ssd_vgg,yolov3", "--weights",
                              f"ssd_vgg={ws}", "--weights", f"yolov3={wy}", "--data", str(data), "--limit", "2",
                              "--top", "5", "--gradient", "signed",
                              "--out", str(out), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert "multi-node SGLRP maps" in res.output and "1.000 / 1.000" in res.output
    for kind in KINDS:
        assert (out / f"relevance_similarity_{kind}.png").is_file()
    js = json.loads((out / "relevance_similarity.json").read_text())
    assert js["models"] == ["ssd_vgg", "yolov3"] and js["images"] == 2
    assert js["model_info"]["ssd_vgg"]["weights_sha256"] == sha256_file(ws)
    assert js["model_info"]["yolov3"]["weights_sha256"] == sha256_file(wy)
    assert js["settings"]["gradient"] == "signed" and js["settings"]["nodes"]["m"] == 5
    res = runner.invoke(app, ["analyze", "relevance-similarity", "--models", "nope,ssd_vgg", "--data", str(data),
                              "--out", str(tmp_path / "x")])
    assert res.exit_code == 2 and "unknown zoo model 'nope'" in res.output
