"""lmms-eval's own task definitions on local documents (`mllm_efficiency.eval.lmms_tasks`), one test per task: the
override YAML includes the installed task unchanged and replaces only the dataset source; lmms-eval's
ConfigurableTask loads our documents; lmms-eval's own doc_to_visual / doc_to_text / process_results / aggregations
(imported from the installed package, not copied) score them: perfect answers get the perfect score, wrong
answers less. The full `run_eval.sh TASK shapes-vlm fastv 0.75 --limit 20` of every task is marked slow; one
fast end-to-end run (mmmu_val: one- and two-image questions and an open one) is not."""
from __future__ import annotations

import argparse
import glob
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("lmms_eval") is None,
                                reason="lmms-eval is not installed (pip install -e '.[eval]')")

from mllm_efficiency.eval import lmms_tasks  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
N = 12
# the columns of the real hub datasets (those lmms-eval's utils read are among them)
COLUMNS = {
    "textvqa_val": {"image_id", "question_id", "question", "question_tokens", "image", "image_width", "image_height",
                    "flickr_original_url", "flickr_300k_url", "answers", "image_classes", "set_name", "ocr_tokens"},
    "docvqa_val": {"questionId", "question", "question_types", "image", "docId", "ucsf_document_id",
                   "ucsf_document_page_no", "answers", "data_split"},
    "chartqa": {"type", "question", "answer", "image"},
    "ocrbench": {"dataset", "question", "question_type", "answer", "image"},
    "ai2d": {"question", "options", "answer", "image"},
    "gqa": {"id", "imageId", "question", "answer", "fullAnswer", "isBalanced", "groups", "entailed", "equivalent",
            "types", "annotations", "semantic", "semanticStr", "image"},
    "mme": {"question_id", "image", "question", "answer", "category"},
    "pope": {"id", "question_id", "question", "answer", "image_source", "image", "category"},
    "scienceqa_img": {"image", "question", "choices", "answer", "hint", "task", "grade", "subject", "topic",
                      "category", "skill", "lecture", "solution"},
    "mmbench_en_dev": {"index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image", "source",
                       "L2-category", "comment", "split"},
    "realworldqa": {"image", "question", "answer"},
    "mmmu_val": {"id", "question", "options", "explanation", *(f"image_{k}" for k in range(1, 8)), "img_type",
                 "answer", "topic_difficulty", "question_type", "subfield"},
    "videomme": {"video_id", "duration", "domain", "sub_category", "url", "videoID", "question_id", "task_type",
                 "question", "options", "answer"},
}
# the headline metric's value when every answer is right (mme perception: 200 per category, 5 in 6 pairs; mmbench, videomme: percent)
PERFECT = {"ocrbench": N / 1000, "mme": 200.0 * 5, "mmbench_en_dev": 100.0, "videomme": 100.0}


def _true_answer(task: str, doc: dict, target) -> str:
    if task in ("textvqa_val", "docvqa_val"):
        return doc["answers"][0]
    if task == "ocrbench":
        return doc["answer"][0]
    return str(target[0] if isinstance(target, list) else target)


def _wrong_answer(right: str) -> str:
    if len(right) == 1 and right.isalpha():
        return "B" if right.upper() == "A" else "A"  # another option letter (no GPT judge needed for mmbench)
    return "zzzz"


def load_task(task: str, tmp_path: Path, monkeypatch, n: int = N):
    import lmms_eval.api.metrics  # noqa: F401  (registers exact_match, anls, ... as lmms-eval's CLI does)
    from lmms_eval.api.task import ConfigurableTask

    root = tmp_path / "cache"
    monkeypatch.setenv("HF_HOME", str(lmms_tasks.media_home(root)))  # videomme's utils read it when loaded
    yaml_path = lmms_tasks.write_override(task, tmp_path / "tasks", root=root, n=n)
    cfg = lmms_tasks.task_config(task, yaml_path)
    return yaml_path, cfg, ConfigurableTask(config=cfg, model_name="mllm_efficiency")


def _aggregate(task_obj, results: list[dict], tmp_path: Path) -> dict:
    import inspect

    args = argparse.Namespace(output_path=str(tmp_path / "agg"), log_samples=False)
    out = {}
    for metric, fn in task_obj.aggregation().items():
        if metric == "submission":
            continue
        items = [r[metric] for r in results if metric in r]
        if not items:
            continue
        out[metric] = fn(items, args=args) if "args" in inspect.signature(fn).parameters else fn(items)
    return out


@pytest.mark.parametrize("task", sorted(lmms_tasks.TASKS))
def test_task_runs_lmms_eval_own_definition_on_local_docs(task, tmp_path, monkeypatch):
    yaml_path, cfg, t = load_task(task, tmp_path, monkeypatch)

    # the override: lmms-eval's YAML included, only the dataset source replaced
    import yaml as pyyaml

    raw = pyyaml.safe_load("\n".join(ln for ln in yaml_path.read_text().splitlines() if "!function" not in ln))
    assert raw["include"] == str(lmms_tasks.task_yaml(task))
    assert set(raw) <= {"include", "task", "dataset_path", "dataset_name", "dataset_kwargs"}
    assert raw["dataset_kwargs"] == {"load_from_disk": True} and raw["dataset_name"] is None
    installed = str(lmms_tasks.lmms_tasks_dir())
    for hook in ("doc_to_visual", "doc_to_text"):
        assert cfg[hook].__code__.co_filename.startswith(installed), (hook, cfg[hook].__code__.co_filename)
    if "process_results" in cfg:
        assert cfg["process_results"].__code__.co_filename.startswith(installed)

    docs = list(t.test_docs())
    assert len(docs) == N and set(docs[0]) == COLUMNS[task]
    right, wrong = [], []
    for doc in docs:
        visuals = t.doc_to_visual(doc)
        assert visuals, doc
        for v in visuals:
            if task == "videomme":
                assert isinstance(v, str) and os.path.getsize(v) > 0
            else:
                assert v.mode == "RGB" and min(v.size) >= 96
        text = t.doc_to_text(doc)
        assert isinstance(text, str) and text.strip()
        answer = _true_answer(task, doc, t.doc_to_target(doc))
        right.append(t.process_results(doc, [answer]))
        wrong.append(t.process_results(doc, [_wrong_answer(answer)]))
    headline = cfg["metric_list"][0]["metric"]
    # wrong first: ocrbench's aggregation adds into a module-level tally (one aggregation per process in lmms-eval)
    bad = _aggregate(t, wrong, tmp_path)
    good = _aggregate(t, right, tmp_path)
    assert good[headline] == pytest.approx(PERFECT.get(task, 1.0)), good
    assert bad[headline] < good[headline], bad


def test_documents_are_deterministic_for_a_seed(tmp_path):
    a = lmms_tasks.load_docs("pope", tmp_path / "a", n=6, seed=3)
    b = lmms_tasks.load_docs("pope", tmp_path / "b", n=6, seed=3)
    c = lmms_tasks.load_docs("pope", tmp_path / "c", n=6, seed=4)
    assert [d["question"] for d in a] == [d["question"] for d in b]
    assert a[0]["image"].tobytes() == b[0]["image"].tobytes()
    assert [d["question"] for d in a] != [d["question"] for d in c]


def test_mme_questions_come_in_yes_no_pairs(tmp_path):
    docs = lmms_tasks.load_docs("mme", tmp_path, n=14)
    for a, b in zip(docs.select(range(0, 14, 2)), docs.select(range(1, 14, 2))):
        assert a["question_id"] == b["question_id"] and (a["answer"], b["answer"]) == ("Yes", "No")


def test_mmmu_has_multi_image_documents(tmp_path, monkeypatch):
    _, _, t = load_task("mmmu_val", tmp_path, monkeypatch, n=3)
    counts = [len(t.doc_to_visual(d)) for d in t.test_docs()]
    assert counts == [1, 2, 1]


def test_data_source_parsing_and_errors(tmp_path):
    from mllm_efficiency.errors import ConfigError

    assert lmms_tasks.data_sources("") == {}
    assert lmms_tasks.source_for("pope", {}) == "synthetic"
    got = lmms_tasks.data_sources(f"pope=hub,gqa={tmp_path}")
    assert lmms_tasks.source_for("pope", got) == "hub" and lmms_tasks.source_for("gqa", got) == str(tmp_path)
    assert lmms_tasks.source_for("mme", lmms_tasks.data_sources("hub")) == "hub"
    with pytest.raises(ConfigError, match="not a task with a local data override"):
        lmms_tasks.data_sources("nosuch=hub")
    with pytest.raises(ConfigError, match="does not exist"):
        lmms_tasks.data_sources("pope=/no/such/dir")


def test_override_points_at_a_local_copy_of_the_real_dataset(tmp_path, monkeypatch):
    """A folder of the hub's parquet files (here: our documents written as parquet) becomes `dataset_path:
    parquet` with the split's files; lmms-eval's task then reads it."""
    docs = lmms_tasks.load_docs("scienceqa_img", tmp_path / "cache", n=5)
    copy = tmp_path / "ScienceQA" / "ScienceQA-IMG"
    copy.mkdir(parents=True)
    docs.to_parquet(str(copy / "test-00000-of-00001.parquet"))
    text = lmms_tasks.override_yaml("scienceqa_img", str(tmp_path / "ScienceQA"))
    assert "dataset_path: parquet" in text and "test-00000-of-00001.parquet" in text
    from lmms_eval.api.task import ConfigurableTask

    path = lmms_tasks.write_override("scienceqa_img", tmp_path / "tasks", str(tmp_path / "ScienceQA"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "dscache"))
    t = ConfigurableTask(config=lmms_tasks.task_config("scienceqa_img", path), model_name="mllm_efficiency")
    assert [d["question"] for d in t.test_docs()] == [d["question"] for d in docs]
    assert "dataset_path" not in lmms_tasks.override_yaml("pope", "hub")


def test_run_dir_holds_exactly_the_requested_tasks(tmp_path):
    from mllm_efficiency.eval.tasks import write_task_dir

    shapes = write_task_dir(tmp_path / "shapes", tasks=("shapes_vqa",), n=3)
    d = lmms_tasks.run_dir(["shapes_vqa", "pope"], root=tmp_path / "cache", n=4, sources={}, shapes_root=shapes)
    assert sorted(p.name for p in d.glob("*.yaml")) == ["pope.yaml", "shapes_vqa.yaml"]
    from mllm_efficiency.errors import ConfigError

    with pytest.raises(ConfigError, match="run it separately"):
        lmms_tasks.run_dir(["mmstar", "pope"], root=tmp_path / "cache", n=4, sources={})


# ---------------------------------------------------------------------------------------------- end to end
def run_eval(task: str, tmp_path: Path, limit: int, method: str = "fastv", ratio: str = "0.75"):
    env = {**os.environ, "PYTHON": sys.executable, "MLLM_EFF_CACHE": str(tmp_path / "cache"),
           "HF_HOME": str(tmp_path / "hf"), "WANDB_MODE": "disabled"}
    env.pop(lmms_tasks.DATA_ENV, None)
    proc = subprocess.run(["bash", str(REPO / "scripts" / "run_eval.sh"), task, "shapes-vlm", method, ratio,
                           "--limit", str(limit), "--results_root", str(tmp_path / "results")],
                          env=env, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert "Error during evaluation" not in log, log[-4000:]
    label = "vanilla_0" if method == "vanilla" else f"{method}_{ratio}"
    out = tmp_path / "results" / task / "shapes-vlm" / label
    res = json.loads(Path(glob.glob(str(out / "**" / "*_results.json"), recursive=True)[0]).read_text())
    samples = glob.glob(str(out / "**" / f"*_samples_{task}.jsonl"), recursive=True)
    return res, samples, log


def _check_run(task: str, res: dict, samples: list, limit: int) -> None:
    cfg_metric = {"mmbench_en_dev": "gpt_eval_score"}.get(task)
    metrics = {k.split(",")[0] for k in res["results"][task] if "," in k}
    headline = cfg_metric or lmms_tasks.task_config(task)["metric_list"][0]["metric"]
    assert headline in metrics, res["results"][task]
    assert res["n-samples"][task]["effective"] == limit
    assert len(samples) == 1 and len(Path(samples[0]).read_text().splitlines()) == limit


def test_run_eval_sh_runs_an_lmms_eval_task_offline(tmp_path):
    res, samples, log = run_eval("mmmu_val", tmp_path, limit=3)
    _check_run("mmmu_val", res, samples, 3)
    assert "lmms-eval's own task definition on synthetic documents" in log


@pytest.mark.slow  # 20-50 s each on 2 CPU cores (see README: evaluation)
@pytest.mark.parametrize("task", sorted(lmms_tasks.TASKS))
def test_run_eval_sh_limit_20(task, tmp_path):
    res, samples, _ = run_eval(task, tmp_path, limit=20)
    _check_run(task, res, samples, 20)


def test_run_eval_prepares_the_task_folder_and_video_home(tmp_path, monkeypatch):
    from mllm_efficiency.eval.runner import EvalRun, lmms_args, prepare_tasks

    monkeypatch.setenv("MLLM_EFF_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv(lmms_tasks.DATA_ENV, raising=False)
    run = EvalRun("videomme", "shapes-vlm", "fastv", 0.75, results_root=str(tmp_path / "res"))
    include, folder, env = prepare_tasks(run)
    assert include is None and sorted(p.name for p in Path(folder).glob("*.yaml")) == ["videomme.yaml"]
    home = lmms_tasks.media_home()
    assert env["HF_HOME"] == str(home) and len(list((home / "videomme" / "data").glob("*.mp4"))) == 24
    assert env["HF_HUB_CACHE"] and env["HF_DATASETS_CACHE"]  # the other caches stay where they were
    args = lmms_args(run, include, folder)
    assert args[args.index("--tasks") + 1] == folder and "--log_samples" in args

    monkeypatch.setenv(lmms_tasks.DATA_ENV, "hub")  # lmms-eval's task unchanged: the name goes through
    assert prepare_tasks(run) == (None, None, {})
