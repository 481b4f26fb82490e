"""The evaluation metrics on hand-made inputs whose values are known exactly."""
from __future__ import annotations

import math

import numpy as np
import pytest

from kelix.data.detector import Detection
from kelix.eval import metrics as M


def det(shape: str, colour: str, x0: int, y0: int, size: int = 10) -> Detection:
    return Detection(shape, colour, (x0, y0, x0 + size, y0 + size), 0.9)


def test_normalize_answer():
    assert M.normalize_answer("  Red. ") == "red"
    assert M.normalize_answer("LEFT!") == "left"
    assert M.normalize_answer("two  objects") == "two objects"


def test_vqa_scores_overall_per_type_and_holdout():
    preds = ["Red.", "circle", "two", "left", "no"]
    questions = [
        {"a": "red", "type": "colour", "holdout": True},
        {"a": "square", "type": "shape", "holdout": False},
        {"a": "two", "type": "count", "holdout": False},
        {"a": "left", "type": "spatial", "holdout": True},
        {"a": "yes", "type": "exists", "holdout": False},
    ]
    s = M.vqa_scores(preds, questions)
    assert s["vqa_accuracy"] == pytest.approx(0.6)
    assert (s["vqa_acc_colour"], s["vqa_acc_shape"], s["vqa_acc_count"], s["vqa_acc_spatial"], s["vqa_acc_exists"]) \
        == (1.0, 0.0, 1.0, 1.0, 0.0)
    assert s["vqa_holdout_accuracy"] == 1.0
    assert s["vqa_seen_accuracy"] == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="2 predictions for 1 questions"):
        M.vqa_scores(["a", "b"], questions[:1])


def test_vqa_scores_leave_out_empty_subsets():
    s = M.vqa_scores(["red"], [{"a": "red", "type": "colour", "holdout": False}])
    assert "vqa_holdout_accuracy" not in s and s["vqa_seen_accuracy"] == 1.0


def test_geneval_single_object_checks_shape_and_colour_separately():
    objs = [{"colour": "red", "shape": "circle"}]
    assert M.geneval_checks(objs, None, [det("circle", "red", 10, 10)]) == {"single_object": True, "colours": True}
    assert M.geneval_checks(objs, None, [det("circle", "blue", 10, 10)]) == {"single_object": True, "colours": False}
    assert M.geneval_checks(objs, None, []) == {"single_object": False, "colours": False}


def test_geneval_two_objects_with_relation():
    objs = [{"colour": "red", "shape": "circle"}, {"colour": "blue", "shape": "square"}]
    right = [det("circle", "red", 5, 20), det("square", "blue", 40, 20)]
    assert M.geneval_checks(objs, "left of", right) == {
        "two_object": True, "counting": True, "colour_attr": True, "position": True}
    swapped_places = [det("circle", "red", 40, 20), det("square", "blue", 5, 20)]
    assert M.geneval_checks(objs, "left of", swapped_places)["position"] is False
    swapped_colours = [det("circle", "blue", 5, 20), det("square", "red", 40, 20)]
    checks = M.geneval_checks(objs, "left of", swapped_colours)
    assert checks["two_object"] is True and checks["colour_attr"] is False and checks["position"] is False


def test_geneval_counting_fails_on_an_extra_object():
    objs = [{"colour": "red", "shape": "circle"}, {"colour": "blue", "shape": "square"}, {"colour": "green", "shape": "star"}]
    dets = [det("circle", "red", 0, 0), det("square", "blue", 20, 0), det("star", "green", 40, 0)]
    assert M.geneval_checks(objs, None, dets) == {"counting": True, "colour_attr": True}
    assert M.geneval_checks(objs, None, dets + [det("diamond", "yellow", 0, 40)])["counting"] is False


def test_geneval_scores_mean_of_categories_and_strict():
    checks = [{"single_object": True, "colours": False}, {"single_object": True, "colours": True},
              {"two_object": True, "counting": True, "colour_attr": False, "position": False}]
    s = M.geneval_scores(checks)
    assert s["geneval_single_object"] == 1.0 and s["geneval_colours"] == 0.5
    assert s["geneval_two_object"] == 1.0 and s["geneval_counting"] == 1.0
    assert s["geneval_colour_attr"] == 0.0 and s["geneval_position"] == 0.0
    assert s["geneval_overall"] == pytest.approx(3.5 / 6)
    assert s["geneval_strict"] == pytest.approx(1 / 3)


def test_psnr_exact_values():
    zeros = np.zeros((8, 8, 3))
    assert M.psnr(zeros, np.full((8, 8, 3), 0.1)) == pytest.approx(20.0)
    assert M.psnr(np.zeros((4, 4, 3), np.uint8), np.full((4, 4, 3), 255, np.uint8)) == pytest.approx(0.0)
    assert M.psnr(zeros, zeros) == pytest.approx(100.0)  # capped, not infinite
    with pytest.raises(ValueError, match="one shape"):
        M.psnr(zeros, np.zeros((4, 4, 3)))


def test_ssim_exact_values():
    c1 = 0.01 ** 2
    # Constant images: only the luminance term is left, (2*0*0.1 + C1) / (0 + 0.01 + C1).
    assert M.ssim(np.zeros((16, 16, 3)), np.full((16, 16, 3), 0.1)) == pytest.approx(c1 / (0.01 + c1))
    rng = np.random.default_rng(0)
    x = rng.random((32, 32, 3))
    assert M.ssim(x, x) == pytest.approx(1.0)
    noisy = np.clip(x + rng.normal(0, 0.1, x.shape), 0, 1)
    noisier = np.clip(x + rng.normal(0, 0.3, x.shape), 0, 1)
    assert 1.0 > M.ssim(x, noisy) > M.ssim(x, noisier)
    assert M.ssim(x, noisy) == pytest.approx(M.ssim(noisy, x))


def test_detector_agreement_and_reconstruction_scores():
    expected = [[{"shape": "circle", "colour": "red"}],
                [{"shape": "circle", "colour": "red"}, {"shape": "square", "colour": "blue"}]]
    dets = [[det("circle", "red", 0, 0)], [det("circle", "red", 0, 0)]]
    assert M.detector_agreement(expected, dets) == 0.5
    img = np.zeros((8, 8, 3))
    s = M.reconstruction_scores([img, img], [img, np.full((8, 8, 3), 0.1)], expected, dets)
    assert s["recon_psnr"] == pytest.approx((100.0 + 20.0) / 2)
    assert s["recon_detector_agreement"] == 0.5


def test_codebook_scores_utilisation_and_perplexity():
    codes = np.array([[0, 0], [1, 0], [2, 1], [3, 1]])  # [positions, N=2]
    s = M.codebook_scores(codes, codebook_size=4)
    assert s == {"tok_util_0": 1.0, "tok_ppl_0": pytest.approx(4.0), "tok_util_1": 0.5, "tok_ppl_1": pytest.approx(2.0)}
    one = M.codebook_scores(np.zeros((2, 3, 1), dtype=int), codebook_size=8)  # any leading shape
    assert one["tok_util_0"] == 1 / 8 and one["tok_ppl_0"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        M.codebook_scores(np.array([[4]]), codebook_size=4)


def test_to_float_image_accepts_pil_uint8_and_chw():
    from PIL import Image

    arr = np.full((4, 4, 3), 255, np.uint8)
    assert M.to_float_image(Image.fromarray(arr)).max() == 1.0
    assert M.to_float_image(np.ones((3, 5, 5))).shape == (5, 5, 3)
    assert not math.isnan(M.psnr(Image.fromarray(arr), arr))
