"""`mllm-eff predict`: argument errors before any model is loaded, and one end-to-end answer on shapes-vlm."""
from __future__ import annotations

import json

import pytest

from mllm_efficiency.cli import main
from mllm_efficiency.eval import synthetic


@pytest.fixture
def scene(tmp_path):
    """A rendered shapes scene whose answer is known, saved as PNG: (path, question, answer)."""
    sample = synthetic.make_sample(0)
    path = tmp_path / "scene.png"
    synthetic.render(sample).save(path)
    return str(path), synthetic.prompt_text(sample), sample.answer


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if anything tries to load a model."""
    def boom(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr("mllm_efficiency.eval.vlm.load_vlm", boom)


def _error(capsys, argv) -> str:
    assert main(["predict", *argv]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if "error:" in line]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def test_missing_image(capsys, no_model, tmp_path):
    line = _error(capsys, ["--image", str(tmp_path / "nope.png"), "--question", "What?"])
    assert line.startswith("error: --image: no such file") and "nope.png" in line


def test_unreadable_image(capsys, no_model, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    line = _error(capsys, ["--image", str(bad), "--question", "What?"])
    assert line.startswith("error: --image: cannot read") and "bad.png" in line


@pytest.mark.parametrize("ratio", ["1", "1.5", "-0.1", "nan", "x"])
def test_ratio_out_of_range(capsys, no_model, scene, ratio):
    line = _error(capsys, ["--image", scene[0], "--question", "What?", "--method", "fastv", "--ratio", ratio])
    assert "--ratio" in line and "[0, 1)" in line


def test_ratio_without_method(capsys, no_model, scene):
    line = _error(capsys, ["--image", scene[0], "--question", "What?", "--ratio", "0.5"])
    assert line.startswith("error: --ratio:") and "method" in line


def test_unknown_method(capsys, no_model, scene):
    line = _error(capsys, ["--image", scene[0], "--question", "What?", "--method", "nosuch"])
    assert line.startswith("error: --method:") and "'nosuch'" in line and "fastv" in line


def test_bad_method_parameter(capsys, no_model, scene):
    line = _error(capsys, ["--image", scene[0], "--question", "What?", "--method", "fastv+fastv"])
    assert line.startswith("error: --method:")


def test_missing_model_dir(capsys, no_model, scene, tmp_path):
    line = _error(capsys, ["--image", scene[0], "--question", "What?", "--model", str(tmp_path / "nomodel")])
    assert line.startswith("error: --model:") and "nomodel" in line


def test_empty_question_and_json_dir(capsys, no_model, scene, tmp_path):
    assert _error(capsys, ["--image", scene[0], "--question", "  "]).startswith("error: --question:")
    line = _error(capsys, ["--image", scene[0], "--question", "What?", "--json", str(tmp_path / "no" / "r.json")])
    assert line.startswith("error: --json:")


def test_required_arguments(capsys, no_model):
    assert main(["predict", "--question", "What?"]) == 2
    assert "--image" in capsys.readouterr().err


def test_help_lists_predict(capsys):
    assert main(["--help"]) == 0
    assert "predict" in capsys.readouterr().out


def test_end_to_end_shapes_vlm(capsys, scene, tmp_path):
    """No arguments but the image and the question: shapes-vlm answers, with the efficiency numbers."""
    image, question, answer = scene
    out = tmp_path / "r.json"
    assert main(["predict", "--image", image, "--question", question, "--json", str(out),
                 "--max-new-tokens", "4"]) == 0
    text = capsys.readouterr().out
    result = json.loads(out.read_text())
    assert text.startswith(f"answer: {result['answer']}\n")
    assert synthetic.exact_match(result["answer"], answer) == 1.0, (result["answer"], answer)
    assert result["model"] == "shapes-vlm" and result["method"] == "vanilla"
    assert result["visual_tokens"] == result["kept_visual_tokens"] == 64
    assert result["prefill_ms"] > 0 and result["kv_bytes"] > 0
    assert result["path"] in ("fast-eager", "fast-graph", "stock")
    assert "kept visual tokens 64/64" in text and "prefill" in text and "KV" in text


def test_predict_api_with_fastv(scene):
    """The Python entry with an already loaded model: FastV keeps 16 of 64 at R=0.75, less KV than vanilla,
    and the method is removed afterwards."""
    from mllm_efficiency.eval.predict import predict
    from mllm_efficiency.eval.shapes_vlm import load_shapes_vlm

    loaded = load_shapes_vlm()
    image, question, _ = scene
    base = predict(image, question, loaded=loaded, max_new_tokens=2)
    pruned = predict(image, question, method="fastv", ratio=0.75, loaded=loaded, max_new_tokens=2)
    assert (pruned["visual_tokens"], pruned["kept_visual_tokens"]) == (64, 16)
    assert pruned["kept_tokens"] == base["prompt_tokens"] - 48
    assert pruned["kv_bytes"] < base["kv_bytes"]
    again = predict(image, question, loaded=loaded, max_new_tokens=2)
    assert again["kv_bytes"] == base["kv_bytes"] and again["answer"] == base["answer"]
