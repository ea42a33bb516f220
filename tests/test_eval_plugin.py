"""lmms-eval plugin end to end (tiny random LLaVA, 3-question local shapes task, lmms-eval's own CLI, offline), and
the argument checks of scripts/run_eval.sh / `mllm-eff eval` (these need no lmms-eval)."""
from __future__ import annotations

import glob
import importlib.util
import json
import os
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from mllm_efficiency.eval import cli as eval_cli
from mllm_efficiency.eval.runner import EvalRun, lmms_args

REPO = Path(__file__).resolve().parents[1]
HAS_LMMS_EVAL = importlib.util.find_spec("lmms_eval") is not None
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "disabled"}
RUNS = {"vanilla": "method=vanilla", "fastv": "method=fastv,ratio=0.75"}  # FastV: K=2 default, 16 -> 4 visual


# ---------------------------------------------------------------------------------------------------------- e2e
@pytest.mark.skipif(not HAS_LMMS_EVAL, reason="lmms-eval is not installed (pip install -e '.[eval]')")
def test_lmms_eval_cli_runs_tiny_llava_on_local_task(tmp_path):
    names = [ep.name for ep in entry_points(group="lmms_eval.models")]
    if "mllm_efficiency" not in names:
        pytest.fail("the entry point lmms_eval.models:mllm_efficiency is not installed; "
                    "reinstall the package (pip install -e '.[eval]') so lmms-eval finds --model mllm_efficiency")
    from mllm_efficiency.eval.local_processor import tiny_llava_processor
    from mllm_efficiency.eval.tasks import write_task_dir
    from mllm_efficiency.testing import tiny_llava

    model_dir = tmp_path / "tiny-llava"
    tiny_llava().save_pretrained(model_dir)
    tiny_llava_processor().save_pretrained(model_dir)
    tasks = write_task_dir(tmp_path / "tasks", tasks=("shapes_vqa",), n=3)

    out = tmp_path / "out"
    configs = [dict(model="mllm_efficiency", tasks="shapes_vqa", include_path=str(tasks), batch_size=1,
                    output_path=str(out / name), log_samples=True,
                    model_args=f"pretrained={model_dir},{args},efficiency_log={out / name / 'efficiency.jsonl'}")
               for name, args in RUNS.items()]
    cfg = tmp_path / "runs.yaml"
    cfg.write_text(json.dumps(configs))  # JSON is YAML; lmms-eval runs the listed configs one after another
    env = {**os.environ, **OFFLINE, "HF_HOME": str(tmp_path / "hf")}
    proc = subprocess.run([sys.executable, "-m", "lmms_eval", "--config", str(cfg)], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert "Error during evaluation" not in log, log[-4000:]  # lmms-eval's CLI exits 0 after errors

    eff = {}
    for name in RUNS:
        results = glob.glob(str(out / name / "**" / "*_results.json"), recursive=True)
        assert len(results) == 1, (name, log[-4000:])
        res = json.loads(Path(results[0]).read_text())
        assert 0.0 <= res["results"]["shapes_vqa"]["exact_match,none"] <= 1.0
        assert res["n-samples"]["shapes_vqa"]["effective"] == 3
        assert res["efficiency"]["overall"]["docs_with_token_counts"] == 3  # our GenerationResult token counts
        samples = glob.glob(str(out / name / "**" / "*_samples_shapes_vqa.jsonl"), recursive=True)
        rows = [json.loads(line) for line in Path(samples[0]).read_text().splitlines()]
        assert sorted(r["doc_id"] for r in rows) == [0, 1, 2]
        assert all(isinstance(r["filtered_resps"], str) and "exact_match" in r for r in rows)

        lines = (out / name / "efficiency.jsonl").read_text().splitlines()
        eff[name] = {r["doc_id"]: r for r in map(json.loads, lines)}
        assert sorted(eff[name]) == [0, 1, 2]
        for r in eff[name].values():
            assert r["method"] == name and r["task"] == "shapes_vqa"
            assert r["prefill_ms"] > 0 and r["kv_bytes"] > 0 and r["visual_tokens"] == 16
        summary = json.loads((out / name / "efficiency.summary.json").read_text())
        assert summary["samples"] == 3 and summary["mean_prefill_ms"] > 0
        assert f"[mllm_efficiency] {name}: 3 samples" in log

    for doc in range(3):
        v, f = eff["vanilla"][doc], eff["fastv"][doc]
        assert v["prompt_tokens"] == f["prompt_tokens"] == v["kept_tokens"]
        assert f["kept_tokens"] == f["prompt_tokens"] - 12  # 16 visual tokens, R = 0.75 keeps 4 after layer K
        assert f["kv_bytes"] < v["kv_bytes"]


# ------------------------------------------------------------------------------- argument checks (no lmms-eval)
def _script(*args):
    env = {**os.environ, "PYTHON": sys.executable}
    return subprocess.run(["bash", str(REPO / "scripts" / "run_eval.sh"), *args], env=env, capture_output=True,
                          text=True, timeout=120)


@pytest.mark.parametrize("args, needle", [
    (("shapes_vqa", "shapes-vlm", "nosuchmethod", "0.5"), "unknown method 'nosuchmethod'"),
    (("shapes_vqa", "shapes-vlm", "fastv", "-0.1"), "RATIO must be in [0, 1)"),
    (("shapes_vqa", "shapes-vlm"), "TASK MODEL METHOD RATIO"),
])
def test_run_eval_sh_rejects_bad_arguments(args, needle):
    proc = _script(*args)
    assert proc.returncode != 0
    assert needle in proc.stderr, proc.stderr


@pytest.mark.parametrize("args, needle", [
    (["shapes_vqa", "shapes-vlm", "nosuchmethod", "0.5"], "method: unknown method 'nosuchmethod'"),
    (["shapes_vqa", "shapes-vlm", "fastv", "1.0"], "RATIO must be in [0, 1)"),
    (["shapes_vqa", "shapes-vlm", "fastv", "-0.1"], "RATIO must be in [0, 1)"),
    (["shapes_vqa", "shapes-vlm", "fastv", "half"], "RATIO must be a number"),
    (["shapes_vqa", "shapes-vlm", "vanilla", "0.5"], "RATIO must be 0 for method 'vanilla'"),
    (["shapes_vqa", "shapes-vlm", "fastv", "0.5", "--method_args", "nosuch=1"], "'nosuch'"),
    (["shapes_vqa", "shapes-vlm", "fastv"], "missing: RATIO"),
    (["shapes_vqa"], "missing: MODEL METHOD RATIO"),
])
def test_mllm_eff_eval_rejects_bad_arguments(args, needle, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "lmms_eval", None)  # the checks must run before (and without) lmms-eval
    rc = eval_cli.main(["eval", *args])
    err = capsys.readouterr().err
    assert rc == 2
    assert needle in err, err


def test_run_eval_builds_the_lmms_eval_command(tmp_path):
    run = EvalRun("shapes_vqa", "/models/tiny", "fastv", 0.75, "k=3", ["--limit", "3"], str(tmp_path))
    args = lmms_args(run, Path("/tasks"))
    assert args[:2] == ["--model", "mllm_efficiency"]
    model_args = args[args.index("--model_args") + 1].split(",")
    out = tmp_path / "shapes_vqa" / "tiny" / "fastv-k3_0.75"
    assert model_args == ["pretrained=/models/tiny", "method=fastv", "ratio=0.75", "k=3",
                          f"efficiency_log={out / 'efficiency.jsonl'}"]
    assert args[args.index("--include_path") + 1] == "/tasks"
    assert args[args.index("--output_path") + 1] == str(out)
    assert args[-2:] == ["--limit", "3"]


def test_entry_point_module_imports_without_lmms_eval(monkeypatch):
    """lmms-eval loads the entry point while importing lmms_eval.models: the module must not import lmms-eval."""
    import importlib

    import mllm_efficiency.eval.lmms_main as m

    monkeypatch.setitem(sys.modules, "lmms_eval", None)
    m = importlib.reload(m)
    assert m.MODEL_ID == "mllm_efficiency" and m.CLASS_PATH == "mllm_efficiency.eval.plugin.MLLMEfficiency"
    with pytest.raises(ImportError):
        m.manifests()


def test_cache_size_counts_one_row_of_a_batched_cache():
    import torch
    from transformers import DynamicCache

    from mllm_efficiency.core.attachments import output_cache as cache_of
    from mllm_efficiency.eval.efficiency import cache_size

    cache = DynamicCache()
    for layer in range(2):
        kv = torch.zeros(3, 2, 5 + layer, 4, dtype=torch.float16)  # (B, KV heads, tokens, head dim)
        cache.update(kv, kv.clone(), layer)
    tokens, total = cache_size(cache)
    row_tokens, row_bytes = cache_size(cache, row=1)
    assert tokens == row_tokens == 5.5
    assert total == 2 * 2 * (5 + 6) * 3 * 2 * 4  # keys + values, 2 bytes each, 3 rows
    assert row_bytes * 3 == total

    class Output:
        cache, past_key_values = "new", "old"

    assert cache_of(Output()) == "new"


# ------------------------------------------------------------------------------- the plugin's fast path, in-process
@pytest.mark.skipif(not HAS_LMMS_EVAL, reason="lmms-eval is not installed (pip install -e '.[eval]')")
def test_plugin_fast_path_batched_equals_stock(tmp_path):
    """fast=true with batch_size 3 (grouped by prompt shape) gives the stock path's texts in request order, and
    its efficiency rows say which path ran."""
    from types import SimpleNamespace

    from mllm_efficiency.eval import synthetic
    from mllm_efficiency.eval.local_processor import tiny_llava_processor
    from mllm_efficiency.eval.plugin import MLLMEfficiency
    from mllm_efficiency.fast import release
    from mllm_efficiency.testing import tiny_llava

    model_dir = tmp_path / "tiny-llava"
    tiny_llava().save_pretrained(model_dir)
    tiny_llava_processor().save_pretrained(model_dir)
    samples = synthetic.make_samples(5)
    docs = [{"image": synthetic.render(s), "question": synthetic.prompt_text(s)} for s in samples]
    contexts = ["What shape is in the top row?"] * 3 + ["How many shapes are there?"] * 2  # two prompt shapes
    requests = [SimpleNamespace(args=(c, {"max_new_tokens": 4, "until": ["\n"]}, lambda doc: [doc["image"]], i,
                                      "t", "test")) for i, c in enumerate(contexts)]
    texts = {}
    for fast in ("false", "true"):
        plugin = MLLMEfficiency(pretrained=str(model_dir), method="fastv", ratio=0.75, fast=fast, batch_size=3,
                                device="cpu")
        plugin.task_dict = {"t": {"test": docs}}
        texts[fast] = [r.text if hasattr(r, "text") else r for r in plugin.generate_until(requests)]
        paths = {row["path"] for row in plugin.efficiency_rows}
        assert paths == ({"stock"} if fast == "false" else {"fast-eager"})
        assert sorted(row["doc_id"] for row in plugin.efficiency_rows) == list(range(5))
        assert all(row["batch"] in (2, 3) for row in plugin.efficiency_rows)  # two prompt shapes: 3 + 2
        assert all(row["kv_bytes"] > 0 for row in plugin.efficiency_rows)
        release(plugin.model)
        for handle in plugin.handles:
            handle.remove()
    assert texts["true"] == texts["false"]


def test_plugin_rejects_a_bad_fast_value():
    from mllm_efficiency.eval.plugin import _fast_setting

    assert _fast_setting("AUTO") == "auto" and _fast_setting("true") is True and _fast_setting(False) is False
    with pytest.raises(Exception, match="fast must be auto, true or false"):
        _fast_setting("sometimes")
