"""lmms-eval's own task definitions on local documents: textvqa_val, docvqa_val, chartqa, ocrbench, ai2d, gqa, mme,
pope, scienceqa_img, mmbench_en_dev, realworldqa, mmmu_val, videomme.

Each local task is a YAML that ``include:``s the task's YAML from the installed ``lmms_eval/tasks/`` (so its
``doc_to_visual``, ``doc_to_text`` with ``lmms_eval_specific_kwargs``, ``generation_kwargs``, ``process_results``,
metrics and aggregations are lmms-eval's own, unchanged) and overrides only where the documents come from:

    include: .../lmms_eval/tasks/textvqa/textvqa_val.yaml
    task: textvqa_val
    dataset_path: /cache/.../data/textvqa_val-s0-n100     # a DatasetDict saved with save_to_disk
    dataset_name: null
    dataset_kwargs: {load_from_disk: true}

The documents (`docs.BUILDERS`) have the real dataset's columns and types and are a pure function of (task, seed,
index). The data source is chosen per task by ``MLLM_EFF_TASK_DATA``: unset or ``synthetic`` = generated here;
``hub`` = lmms-eval's task unchanged (its hub dataset); ``TASK=PATH[,TASK=PATH...]`` (or a bare PATH for every
task) = a local copy of the real dataset: a ``save_to_disk`` folder, or a folder of the hub's parquet files
(``<split>-*.parquet`` anywhere below it, in the ``<dataset_name>/`` subfolder when there is one).

lmms-eval indexes its own tasks before ``--include_path`` ones, so a same-named task cannot be overridden through
the index; run_eval passes a folder of these YAMLs as ``--tasks DIR`` instead (lmms-eval loads every YAML in it
and merges it over the registered task of the same name).
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import os
import shutil
from pathlib import Path

from ...errors import ConfigError

DATA_ENV = "MLLM_EFF_TASK_DATA"


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    name: str
    yaml: str               # lmms-eval's task YAML, relative to lmms_eval/tasks/
    split: str              # its test_split
    default_n: int = 100    # documents generated (run_eval's --limit takes the first ones)
    hub_config: str = ""    # the hub dataset's config (dataset_name): its subfolder in a local parquet copy
    utils: str = "utils.py"  # where its hooks live, beside the YAML


TASKS = {t.name: t for t in [
    TaskSpec("textvqa_val", "textvqa/textvqa_val.yaml", "validation"),
    TaskSpec("docvqa_val", "docvqa/docvqa_val.yaml", "validation", hub_config="DocVQA"),
    TaskSpec("chartqa", "chartqa/chartqa.yaml", "test"),
    TaskSpec("ocrbench", "ocrbench/ocrbench.yaml", "test"),
    TaskSpec("ai2d", "ai2d/ai2d.yaml", "test"),
    TaskSpec("gqa", "gqa/gqa.yaml", "testdev", hub_config="testdev_balanced_instructions"),
    TaskSpec("mme", "mme/mme.yaml", "test"),
    TaskSpec("pope", "pope/pope.yaml", "test"),
    TaskSpec("scienceqa_img", "scienceqa/scienceqa_img.yaml", "test", hub_config="ScienceQA-IMG"),
    TaskSpec("mmbench_en_dev", "mmbench/mmbench_en_dev.yaml", "dev", hub_config="en", utils="en_utils.py"),
    TaskSpec("realworldqa", "realworldqa/realworldqa.yaml", "test"),
    TaskSpec("mmmu_val", "mmmu/mmmu_val.yaml", "validation"),
    TaskSpec("videomme", "videomme/videomme.yaml", "test", default_n=24),
]}


def spec(task: str) -> TaskSpec:
    if task not in TASKS:
        raise ConfigError(f"no local documents for task {task!r}; tasks with local documents: {sorted(TASKS)}")
    return TASKS[task]


def lmms_tasks_dir() -> Path:
    """The installed lmms_eval/tasks/ folder (found without importing lmms_eval)."""
    found = importlib.util.find_spec("lmms_eval")
    if found is None or not found.submodule_search_locations:
        raise ConfigError("lmms-eval is not installed (pip install -e '.[eval]'); its task definitions are needed")
    return Path(list(found.submodule_search_locations)[0]) / "tasks"


def task_yaml(task: str) -> Path:
    path = lmms_tasks_dir() / spec(task).yaml
    if not path.is_file():
        raise ConfigError(f"{task}: lmms-eval's task file {path} is missing (lmms-eval >= 0.7.3 is needed)")
    return path


def load_utils(task: str):
    """lmms-eval's own hooks module of `task`, loaded from its file as lmms-eval's `!function` loader does (a fresh
    module: module-level settings such as videomme's HF_HOME are read now)."""
    path = task_yaml(task).parent / spec(task).utils
    module = importlib.util.module_from_spec(importlib.util.spec_from_file_location(path.stem, path))
    module.__spec__.loader.exec_module(module)
    return module


def task_config(task: str, yaml_path: str | Path | None = None) -> dict:
    """The task's full config as lmms-eval reads it (includes resolved, `!function`s imported): of the local
    override `yaml_path` when given, else of lmms-eval's own YAML."""
    from lmms_eval import utils

    return utils.load_yaml_config(str(yaml_path or task_yaml(task)), mode="full")


def default_root() -> Path:
    base = os.environ.get("MLLM_EFF_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "mllm_efficiency")
    return Path(base) / "eval_tasks" / "lmms"


def media_home(root: str | Path | None = None) -> Path:
    """The HF_HOME under which the synthetic videos lie (videomme reads $HF_HOME/videomme/data/<videoID>.mp4);
    run_eval points HF_HOME there for the lmms-eval process and keeps the hub and datasets caches where they were."""
    return Path(root or default_root()) / "hf_home"


# ------------------------------------------------------------------------------------------------ documents
def build_data(task: str, root: str | Path | None = None, n: int | None = None, seed: int = 0) -> Path:
    """Generate `task`'s documents (once per (task, seed, n)) as a DatasetDict saved under `root`; returns its
    folder (`dataset_path` with `load_from_disk`)."""
    import datasets
    from datasets import Dataset, DatasetDict

    from . import docs

    s = spec(task)
    n = s.default_n if n is None else n
    if not isinstance(n, int) or n < 1:
        raise ConfigError(f"number of documents must be an integer >= 1, got {n!r}")
    root = Path(root or default_root())
    out = root / "data" / f"{task}-s{seed}-n{n}"
    if (out / "DONE").is_file():
        return out
    built = docs.BUILDERS[task](n, seed, media_home(root))
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    quiet = not datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        DatasetDict({s.split: Dataset.from_list(built.rows, features=built.features)}).save_to_disk(str(tmp))
        for name, (rows, features) in built.tables.items():
            DatasetDict({s.split: Dataset.from_list(rows, features=features)}).save_to_disk(
                str(tmp / "tables" / name))
    finally:
        if not quiet:
            datasets.enable_progress_bars()
    (tmp / "DONE").write_text(json.dumps({"task": task, "seed": seed, "n": n}))
    shutil.rmtree(out, ignore_errors=True)
    tmp.replace(out)
    return out


def load_docs(task: str, root: str | Path | None = None, n: int | None = None, seed: int = 0):
    """The documents as lmms-eval sees them (the test split, after the task's local `process_docs`, if any)."""
    import datasets

    path = build_data(task, root, n, seed)
    docs = datasets.load_from_disk(str(path))[spec(task).split]
    if task == "gqa":
        docs = join_images(docs, str(path / "tables" / "images"))
    return docs


def join_images(dataset, images: str):
    """GQA's `process_docs` on local data: the `image` of each document from the images table (id, image) at
    `images` (a save_to_disk folder or parquet files), joined by `imageId` as lmms-eval's gqa_process_docs does
    with the hub's testdev_balanced_images."""
    table = _load_table(images, "testdev")
    index = {i: k for k, i in enumerate(table["id"])}
    missing = sorted({d for d in dataset["imageId"] if d not in index})[:3]
    if missing:
        raise ConfigError(f"gqa: images {missing} of the documents are not in the images table {images}")
    return dataset.map(lambda doc: {"image": table[index[doc["imageId"]]]["image"]})


def _load_table(path: str, split: str):
    import datasets

    p = Path(path)
    if (p / "dataset_dict.json").is_file() or (p / "state.json").is_file():
        loaded = datasets.load_from_disk(str(p))
        return loaded[split] if isinstance(loaded, datasets.DatasetDict) else loaded
    files = _parquet_files(p, split, "")
    return datasets.load_dataset("parquet", data_files={split: files}, split=split)


def _parquet_files(root: Path, split: str, config: str) -> list[str]:
    base = root / config if config and (root / config).is_dir() else root
    files = sorted(str(f) for f in base.rglob(f"{split}-*.parquet")) or sorted(str(f) for f in base.rglob(
        f"{split}*.parquet"))
    if not files:
        raise ConfigError(f"no {split}-*.parquet files under {base} (a local copy of the hub dataset's files)")
    return files


# ----------------------------------------------------------------------------------------------- data source
def data_sources(text: str | None = None) -> dict[str, str]:
    """`MLLM_EFF_TASK_DATA` parsed: {task or "*": "synthetic" | "hub" | PATH}."""
    text = (os.environ.get(DATA_ENV, "") if text is None else text).strip()
    out: dict[str, str] = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        task, sep, value = item.partition("=")
        if not sep:
            task, value = "*", item
        task, value = task.strip(), value.strip()
        if task != "*" and task not in TASKS:
            raise ConfigError(f"{DATA_ENV}: {task!r} is not a task with a local data override; one of {sorted(TASKS)}")
        if value not in ("synthetic", "hub") and not Path(value).expanduser().exists():
            raise ConfigError(f"{DATA_ENV}: {task if task != '*' else 'data'} path {value!r} does not exist "
                              "(give synthetic, hub, or a local copy of the dataset)")
        out[task] = value
    return out


def source_for(task: str, sources: dict[str, str] | None = None) -> str:
    sources = data_sources() if sources is None else sources
    return sources.get(task, sources.get("*", "synthetic"))


_HEADER = "# generated by mllm_efficiency.eval.lmms_tasks: lmms-eval's own {task} task ({what})\n"


def override_yaml(task: str, source: str = "synthetic", root: str | Path | None = None, n: int | None = None,
                  seed: int = 0, out_dir: Path | None = None) -> str:
    """The YAML text of the local task: lmms-eval's YAML included, the dataset source overridden."""
    import yaml

    s = spec(task)
    include = str(task_yaml(task))
    body: dict = {"include": include, "task": task}
    extra_files: dict[str, str] = {}
    if source == "hub":
        what = "its hub dataset, unchanged"
    elif source == "synthetic":
        path = build_data(task, root, n, seed)
        what = f"synthetic documents, seed {seed}"
        body.update(dataset_path=str(path), dataset_name=None, dataset_kwargs={"load_from_disk": True})
        if task == "gqa":
            extra_files["gqa_images.py"] = str(path / "tables" / "images")
    else:
        p = Path(source).expanduser().resolve()
        what = f"local copy of the dataset at {p}"
        if (p / "dataset_dict.json").is_file():
            body.update(dataset_path=str(p), dataset_name=None, dataset_kwargs={"load_from_disk": True})
        else:
            files = _parquet_files(p, s.split, s.hub_config)
            body.update(dataset_path="parquet", dataset_name=None, dataset_kwargs={"data_files": {s.split: files}})
        if task == "gqa":
            images = p / "testdev_balanced_images"
            extra_files["gqa_images.py"] = str(images if images.is_dir() else p / "tables" / "images")
    text = _HEADER.format(task=task, what=what) + yaml.safe_dump(body, sort_keys=False)
    if "gqa_images.py" in extra_files:
        text += "process_docs: !function gqa_images.process_docs\n"
        if out_dir is not None:
            (out_dir / "gqa_images.py").write_text(
                '"""Generated by mllm_efficiency.eval.lmms_tasks: GQA\'s images joined from a local table."""\n'
                "from mllm_efficiency.eval.lmms_tasks import join_images\n\n"
                f"IMAGES = {extra_files['gqa_images.py']!r}\n\n\n"
                "def process_docs(dataset):\n    return join_images(dataset, IMAGES)\n")
    return text


def write_override(task: str, out_dir: str | Path, source: str = "synthetic", root: str | Path | None = None,
                   n: int | None = None, seed: int = 0) -> Path:
    """Write `<out_dir>/<task>.yaml` (and any helper module it names); returns the YAML's path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{task}.yaml"
    path.write_text(override_yaml(task, source, root, n, seed, out_dir))
    return path


def run_dir(tasks: list[str], root: str | Path | None = None, seed: int = 0, n: int | None = None,
            sources: dict[str, str] | None = None, shapes_root: Path | None = None) -> Path:
    """A folder holding exactly the YAMLs of `tasks` (for `--tasks DIR`): the lmms-eval tasks as local overrides,
    the shapes tasks (`shapes_root`: their written task folders) included from their own YAMLs."""
    root = Path(root or default_root())
    sources = data_sources() if sources is None else sources
    key = json.dumps([tasks, seed, n, {t: source_for(t, sources) for t in tasks if t in TASKS},
                      str(shapes_root)], sort_keys=True)
    out = root / "runs" / hashlib.sha256(key.encode()).hexdigest()[:12]
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.yaml"):
        old.unlink()
    for task in tasks:
        if task in TASKS:
            write_override(task, out, source_for(task, sources), root, n, seed)
        elif shapes_root is not None and (shapes_root / task / f"{task}.yaml").is_file():
            (out / f"{task}.yaml").write_text(f"include: {shapes_root / task / f'{task}.yaml'}\ntask: {task}\n")
        else:
            raise ConfigError(f"task {task!r} cannot run in one lmms-eval call with {sorted(set(tasks) & set(TASKS))} "
                              "(their local documents need --tasks DIR); run it separately")
    return out
