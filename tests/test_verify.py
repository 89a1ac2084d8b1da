"""`qasr verify`: the stages it reports, exactness against itself, one line for what falls short or is bad."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qasr.cli import main
from qasr.export.quantize import quantize_bundle
from qasr.runtime.verify import LIMITS, Clip, Report, edit_distance, id_agreement, normalize_text, text_errors
from support import DATA

EN, ZH = str(DATA / "en_16k_s16.wav"), str(DATA / "zh_16k_f32_loud.wav")


@pytest.fixture(scope="module")
def int8(bundle, tmp_path_factory):
    return quantize_bundle(bundle("tiny"), tmp_path_factory.mktemp("verify") / "int8", "int8",
                           progress=lambda line: None)


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _error_lines(err: str, prefix: str) -> list[str]:
    assert "Traceback" not in err, err
    return [line for line in err.splitlines() if line.startswith(prefix)]


def test_reports_every_stage_against_the_recorded_fp32(capsys, bundle, int8):
    code, out, err = run(capsys, "verify", int8, EN, ZH, "--format", "json", "--max-new-tokens", 12)
    report = json.loads(out)
    assert report["reference"] == str(Path(bundle("tiny")).resolve())
    assert report["precision"] == {"audio": "fp32", "decoder": "int8", "ids": "int8", "text": "int8"}
    f = report["figures"]
    assert f["audio"]["rel_error"] == 0.0  # the encoder and projector are the fp32 graphs, copied
    assert 0.9 < f["decoder"]["logit_cosine_mean"] < 1.0 and 0 < f["decoder"]["top1"] <= 1
    assert f["decoder"]["steps"] >= 2 and set(f["ids"]["first_divergence"]) == {EN, ZH}
    assert f["text"]["cer"] >= 0 and len(report["clips"]) == 2
    shortfall = _error_lines(err, "qasr: verify: ")
    assert code == (1 if report["shortfall"] else 0)
    assert shortfall == ([f"qasr: verify: {report['shortfall']}"] if code else [])
    if code:
        assert shortfall[0].split()[2].rstrip(":") in ("audio", "decoder", "ids", "text")


@pytest.mark.parametrize("which", ["fp32", "int8"])
def test_a_bundle_against_itself_is_exact(capsys, bundle, int8, which):
    path = bundle("tiny") if which == "fp32" else int8
    code, out, err = run(capsys, "verify", path, EN, "--reference", path, "--format", "json")
    f = json.loads(out)["figures"]
    assert code == 0 and not _error_lines(err, "qasr:")
    assert f["audio"]["rel_error"] == 0.0 and f["decoder"]["logit_cosine_min"] == pytest.approx(1, abs=1e-12)
    assert f["decoder"]["top1"] == 1.0 and f["ids"]["agreement"] == 1.0 and f["text"]["cer"] == 0.0
    assert f["ids"]["first_divergence"] == {EN: None}


def test_text_report_names_the_stages(capsys, int8):
    code, out, _ = run(capsys, "verify", int8, EN, "--reference", int8)
    assert code == 0
    assert [line.split()[0] for line in out.splitlines()[1:]] == ["audio", "decoder", "ids", "text", "result"]
    assert "within the limits" in out


def test_checkpoint_reference_is_exported_first(capsys, checkpoint, int8):
    _, by_checkpoint, _ = run(capsys, "verify", int8, EN, "--reference", checkpoint("tiny"), "--format", "json",
                              "--max-new-tokens", 6)
    _, by_bundle, _ = run(capsys, "verify", int8, EN, "--format", "json", "--max-new-tokens", 6)
    assert json.loads(by_checkpoint)["figures"]["decoder"] == json.loads(by_bundle)["figures"]["decoder"]


def test_shortfall_names_the_first_stage_outside_its_limit():
    clip = Clip("a.wav", embed_rel=0.0, embed_cosine=1.0, logit_cosines=[0.999, 0.98], top1=[True, False],
                ids=([1, 2, 3], [1, 4, 3]), texts=("abc", "abd"))
    report = Report("b", "r", "onnxruntime", {"audio": "fp32", "decoder": "int8", "ids": "int8", "text": "int8"},
                    [clip])
    assert report.shortfall() == (f"decoder: mean logit cosine 0.9895 is outside the int8 limit "
                                  f"(>= {LIMITS['int8'].logit_cosine:g})")
    assert clip.first_divergence == 1 and report.figures()["text"]["cer"] == pytest.approx(1 / 3)


def test_cer_against_the_true_text_is_judged_by_its_rise_over_fp32():
    def report(bundle_text):
        clip = Clip("a.wav", 0.0, 1.0, [1.0], [True], ([1], [1]), ("the cat sat", bundle_text), truth="The cat sat.")
        return Report("b", "r", "onnxruntime", {"audio": "fp32", "decoder": "int4", "ids": "int4", "text": "int4"},
                      [clip])

    assert report("the cat sat").figures()["truth"] == {"cer": 0.0, "reference_cer": 0.0, "rise": 0.0}
    worse = report("the bat sat")
    assert worse.figures()["truth"]["cer"] == pytest.approx(1 / 11)
    assert worse.shortfall() == (f"text: CER rise over fp32 against the true text 0.09091 is outside the int4 limit "
                                 f"(<= {LIMITS['int4'].truth_rise:g})")
    assert "truth" in worse.to_text() and "truth" not in Report("b", "r", "x", worse.precision, [
        Clip("a.wav", 0.0, 1.0, [1.0], [True], ([1], [1]), ("a", "a"))]).figures()


def test_text_is_compared_without_case_punctuation_or_cjk_spaces():
    assert normalize_text("Hello,  World!") == "hello world"
    assert normalize_text("我们 中国。 ok") == "我们中国 ok"
    assert text_errors("hello word", "Hello world.") == (1, 11)


def test_metrics():
    assert edit_distance("kitten", "sitting") == 3 and edit_distance("", "abc") == 3
    assert id_agreement([1, 2, 3, 4], [1, 2, 3]) == 0.75 and id_agreement([], []) == 1.0
    assert Clip("a", 0, 1, [], [], ([1, 2], [1, 2, 3]), ("", "")).first_divergence == 2


def test_no_recorded_reference_is_one_line(capsys, bundle):
    code, _, err = run(capsys, "verify", bundle("tiny"), EN)
    assert code == 1 and "--reference" in _error_lines(err, "qasr: error: ")[0]


def test_reference_from_another_checkpoint_is_one_line(capsys, bundle, int8):
    code, _, err = run(capsys, "verify", int8, EN, "--reference", bundle("tiny", 1))
    assert code == 1 and "another checkpoint" in _error_lines(err, "qasr: error: ")[0]


def test_bad_audio_is_one_line(capsys, int8, tmp_path):
    bad = tmp_path / "bad.wav"
    bad.write_text("not audio")
    code, _, err = run(capsys, "verify", int8, bad)
    assert code == 1 and str(bad) in _error_lines(err, "qasr: error: ")[0]
