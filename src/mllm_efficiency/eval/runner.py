"""`run_eval TASK MODEL METHOD RATIO [extra lmms-eval args]`: validate, then run lmms-eval's CLI with our plugin.

RATIO is the fraction of tokens REMOVED (FastV's R, kvpress's compression_ratio); the kept fraction is printed
too (the seed project's RATIO meant "kept"). Results go to results/<task>/<model>/<label>_<ratio>/ unless
--output_path is given, where <label> is the method (chain joined by '+') followed, when --method_args is given, by
'-' and the arguments without '=' (fastv with k=2: fastv-k2_0.75). Local synthetic tasks (shapes_vqa, shapes_video)
are written and included automatically. lmms-eval's own tasks listed in `lmms_tasks.TASKS` (textvqa_val, docvqa_val,
chartqa, ocrbench, ai2d, gqa, mme, pope, scienceqa_img, mmbench_en_dev, realworldqa, mmmu_val, videomme) run on
local documents (lmms-eval's task definition, the dataset source overridden; MLLM_EFF_TASK_DATA picks synthetic
documents, the hub, or a local copy of the real dataset), passed as `--tasks DIR`. Per-sample outputs
(--log_samples) are always written: `mllm-eff report` compares them with the vanilla run's (loyalty).

MODEL is checked before lmms-eval starts: the embedded default (shapes-vlm), a Hugging Face model directory with
config.json, or a hub id already in the local Hugging Face cache (runs are offline unless HF_HUB_OFFLINE=0).
MLLM_EFF_LAUNCHER (e.g. "accelerate launch --num_processes 4") replaces `python` as the launcher of lmms-eval.
"""
from __future__ import annotations

import dataclasses
import glob
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from ..errors import ConfigError
from . import lmms_tasks
from .methods import parse_chain, split_names
from .tasks import LOCAL_TASKS, write_task_dir

DEFAULT_TASK, DEFAULT_MODEL = "shapes_vqa", "shapes-vlm"
# the offline default: vanilla and FastV (K=2, R=0.75), then the score table
DEFAULT_RUNS = (("vanilla", 0.0, ""), ("fastv", 0.75, "k=2"))
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "TOKENIZERS_PARALLELISM": "false"}


@dataclasses.dataclass
class EvalRun:
    task: str
    model: str
    method: str
    ratio: float
    method_args: str = ""  # extra method parameters "k=3,scorer=random"
    extra: list[str] = dataclasses.field(default_factory=list)
    results_root: str = "results"

    @property
    def model_name(self) -> str:
        return re.sub(r"[^A-Za-z0-9._-]+", "_", Path(self.model.rstrip("/")).name or self.model)

    @property
    def label(self) -> str:
        names = split_names(self.method)
        name = "+".join(names) if names else "vanilla"
        if self.method_args:
            name += "-" + re.sub(r"[^A-Za-z0-9.=-]+", "_", self.method_args).replace("=", "")
        return f"{name}_{self.ratio:g}"

    @property
    def output_dir(self) -> Path:
        for i, arg in enumerate(self.extra):
            if arg == "--output_path" and i + 1 < len(self.extra):
                return Path(self.extra[i + 1])
            if arg.startswith("--output_path="):
                return Path(arg.split("=", 1)[1])
        return Path(self.results_root) / self.task / self.model_name / self.label


def parse_ratio(text) -> float:
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise ConfigError(f"RATIO must be a number in [0, 1) (fraction of tokens removed), got {text!r}") from None
    if not 0.0 <= value < 1.0:
        raise ConfigError(f"RATIO must be in [0, 1) (fraction of tokens removed; kept = 1 - RATIO), got {value:g}")
    return value


_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
LAUNCHER_ENV = "MLLM_EFF_LAUNCHER"


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "1").strip().lower() not in ("0", "false", "no", "off", "")


def _in_hub_cache(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    try:
        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:  # an id the hub's validator rejects ("a/b..c")
        return False


def check_model(model: str) -> None:
    """MODEL must be loadable by the plugin without a download: raise `ConfigError` naming it otherwise."""
    from .shapes_vlm import ALIAS

    if model in (ALIAS, "default"):
        return
    path = Path(model).expanduser()
    if path.is_dir():
        if (path / "config.json").is_file():
            return
        raise ConfigError(f"MODEL {model!r} is a directory without config.json (not a Hugging Face model directory)")
    if path.exists():
        raise ConfigError(f"MODEL {model!r} is a file; pass a Hugging Face model directory (with config.json)")
    if _REPO_ID.fullmatch(model) and (not _hub_offline() or _in_hub_cache(model)):
        return
    from ..zoo import ALIASES

    hint = (f"; {model!r} is a text-only zoo alias (use it with bench or quick-start)" if model in ALIASES else "")
    raise ConfigError(f"MODEL {model!r} does not exist: pass {ALIAS!r} (the embedded default), a Hugging Face "
                      f"model directory with config.json, or a hub id already in the local Hugging Face cache "
                      f"(nothing is downloaded unless HF_HUB_OFFLINE=0){hint}")


def launcher_from_env(env=None) -> list[str] | None:
    """The words of MLLM_EFF_LAUNCHER (None when unset or empty); its program must be on PATH."""
    text = (os.environ if env is None else env).get(LAUNCHER_ENV, "").strip()
    if not text:
        return None
    try:
        words = shlex.split(text)
    except ValueError as e:
        raise ConfigError(f"{LAUNCHER_ENV}: cannot split {text!r} into words ({e})") from None
    if shutil.which(words[0]) is None:
        raise ConfigError(f"{LAUNCHER_ENV}: {words[0]!r} is not a program on PATH (value {text!r})")
    return words


# model-level options of the plugin that --method_args may carry too (not method parameters; batch_size and
# device are lmms-eval's own options: --batch_size)
MODEL_OPTIONS = ("fast", "dtype", "max_new_tokens", "conv_template", "attn_implementation", "max_frames_num",
                 "use_cache")


def _method_params(run: EvalRun) -> dict:
    params = {}
    if split_names(run.method):
        params["ratio"] = run.ratio
    for item in filter(None, (s.strip() for s in run.method_args.split(","))):
        if "=" not in item:
            raise ConfigError(f"--method_args items must be key=value, got {item!r}")
        k, v = item.split("=", 1)
        params[k.strip()] = _literal(v.strip())
    return params


def _literal(v: str):
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return {"true": True, "false": False, "none": None}.get(v.lower(), v)


def validate(run: EvalRun) -> None:
    """Every check that can fail before lmms-eval starts (model, unknown method, parameters out of range, ratio)."""
    parse_ratio(run.ratio)
    names = split_names(run.method)
    if not names and run.ratio != 0:
        raise ConfigError(f"RATIO must be 0 for method {run.method!r} (nothing is removed), got {run.ratio:g}")
    parse_chain(run.method, {k: v for k, v in _method_params(run).items() if k not in MODEL_OPTIONS})
    if "--model_args" in run.extra or any(a.startswith("--model_args=") for a in run.extra):
        raise ConfigError("pass method parameters with --method_args k=v,...; --model_args is built by run_eval")
    check_model(run.model)
    if any(t in lmms_tasks.TASKS for t in task_names(run.task)):
        lmms_tasks.data_sources()  # a bad MLLM_EFF_TASK_DATA fails here


def task_names(text: str) -> list[str]:
    names = [t.strip() for t in str(text).split(",")]
    if not all(names):
        raise ConfigError(f"TASK must be task names separated by commas, got {text!r}")
    return names


def prepare_tasks(run: EvalRun) -> tuple[Path | None, str | None, dict]:
    """(--include_path folder, --tasks value replacing the names, environment for lmms-eval) of a run: the shapes
    tasks written and included; lmms-eval's tasks with local documents written into one folder of YAMLs that
    `--tasks` names (lmms-eval merges each over its registered task of the same name)."""
    tasks = task_names(run.task)
    local = [t for t in tasks if t in LOCAL_TASKS]
    sources = lmms_tasks.data_sources() if any(t in lmms_tasks.TASKS for t in tasks) else {}
    overridden = [t for t in tasks if t in lmms_tasks.TASKS and lmms_tasks.source_for(t, sources) != "hub"]
    include = write_task_dir(tasks=local) if local else None
    if not overridden:
        return include, None, {}
    for t in overridden:
        src = lmms_tasks.source_for(t, sources)
        print(f"[run_eval] {t}: lmms-eval's own task definition on "
              + ("synthetic documents (MLLM_EFF_TASK_DATA=hub for the hub dataset, =PATH for a local copy)"
                 if src == "synthetic" else f"the local data at {src}"), flush=True)
    folder = lmms_tasks.run_dir(tasks, sources=sources, shapes_root=include)
    env = {}
    if "videomme" in overridden and lmms_tasks.source_for("videomme", sources) == "synthetic":
        env = _media_env(lmms_tasks.media_home())
    return None, str(folder), env


def _media_env(home: Path) -> dict:
    """HF_HOME pointed at the synthetic videos (videomme reads $HF_HOME/videomme/data), the hub and datasets
    caches and the token kept where they were."""
    old = Path(os.environ.get("HF_HOME", os.path.join(os.path.expanduser("~"), ".cache", "huggingface")))
    return {"HF_HOME": str(home),
            "HF_HUB_CACHE": os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
            or str(old / "hub"),
            "HF_DATASETS_CACHE": os.environ.get("HF_DATASETS_CACHE") or str(old / "datasets"),
            "HF_TOKEN_PATH": os.environ.get("HF_TOKEN_PATH") or str(old / "token")}


def lmms_args(run: EvalRun, include_path: Path | None, tasks: str | None = None) -> list[str]:
    """lmms-eval's arguments; `tasks` replaces the task names (a folder of task YAMLs: `--tasks DIR`)."""
    out = run.output_dir
    model_args = [f"pretrained={run.model}", f"method={run.method}"]
    model_args += [f"{k}={v}" for k, v in _method_params(run).items()]
    model_args.append(f"efficiency_log={out / 'efficiency.jsonl'}")
    args = ["--model", "mllm_efficiency", "--model_args", ",".join(model_args), "--tasks", tasks or run.task,
            "--batch_size", "1"]
    if include_path is not None:
        args += ["--include_path", str(include_path)]
    if not any(a == "--output_path" or a.startswith("--output_path=") for a in run.extra):
        args += ["--output_path", str(out)]
    if "--log_samples" not in run.extra:  # per-sample answers: loyalty against the vanilla run
        args.append("--log_samples")
    if "--batch_size" in run.extra:
        i = args.index("--batch_size")
        del args[i:i + 2]
    return args + list(run.extra)


def find_results(out_dir: Path) -> list[Path]:
    return sorted(Path(p) for p in glob.glob(str(out_dir / "**" / "*results*.json"), recursive=True))


def execute(run: EvalRun, python: str = sys.executable, launcher: list[str] | None = None) -> int:
    """Run one evaluation in a child process; non-zero if lmms-eval wrote no results (its CLI exits 0 on errors).
    `launcher` (default: MLLM_EFF_LAUNCHER's words, else `python`) starts `-m mllm_efficiency.eval.lmms_main`."""
    validate(run)
    launcher = launcher or launcher_from_env()
    include, tasks_arg, task_env = prepare_tasks(run)
    out = run.output_dir
    before = set(find_results(out))
    keep = 1.0 - run.ratio
    print(f"[run_eval] task={run.task} model={run.model} method={run.method} ratio removed={run.ratio:g} "
          f"(kept fraction {keep:g}) -> {out}", flush=True)
    cmd = (launcher or [python]) + ["-m", "mllm_efficiency.eval.lmms_main"] + lmms_args(run, include, tasks_arg)
    print("[run_eval] " + " ".join(shlex.quote(c) for c in cmd), flush=True)
    env = {**os.environ, **({k: v for k, v in OFFLINE_ENV.items() if k not in os.environ}), **task_env}
    rc = subprocess.call(cmd, env=env)
    new = [p for p in find_results(out) if p not in before]
    if rc != 0:
        return rc
    if not new:
        print(f"[run_eval] error: lmms-eval wrote no results under {out} (see the log above)", file=sys.stderr)
        return 1
    (out / "run.json").write_text(json.dumps({"task": run.task, "model": run.model, "method": run.method,
                                              "ratio": run.ratio, "kept_fraction": keep,
                                              "method_args": run.method_args, "results": str(new[-1])}, indent=1))
    return 0
