"""lmms-eval registration of the `mllm_efficiency` model, and a wrapper around lmms-eval's own command line.

* Installed package: pyproject's entry point (group ``lmms_eval.models``) names `manifests` below, which lmms-eval
  calls while it builds its model registry, so plain ``lmms-eval --model mllm_efficiency ...`` (or
  ``python -m lmms_eval ...``) works without forking lmms-eval. This module imports nothing heavy at import time
  (lmms-eval loads it in the middle of importing ``lmms_eval.models``); the model class itself,
  `mllm_efficiency.eval.plugin.MLLMEfficiency`, is imported by lmms-eval only when the model is built.
* `python -m mllm_efficiency.eval.lmms_main ARGS`: lmms-eval's CLI (``lmms_eval.__main__.cli_evaluate``) with the
  model registered in code first. Use it where the entry point is not installed (a source checkout on PYTHONPATH,
  as scripts/run_eval.sh does). Multi-GPU: ``accelerate launch --num_processes N -m mllm_efficiency.eval.lmms_main``.
"""
from __future__ import annotations

import sys

MODEL_ID = "mllm_efficiency"
CLASS_PATH = "mllm_efficiency.eval.plugin.MLLMEfficiency"


def manifests():
    """The entry-point payload: lmms-eval accepts a callable returning `ModelManifest`s."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return [ModelManifest(model_id=MODEL_ID, simple_class_path=CLASS_PATH)]


def register() -> None:
    """Register the model with lmms-eval in this process (what the entry point does when it is installed)."""
    from lmms_eval.models import MODEL_REGISTRY_V2

    for manifest in manifests():
        MODEL_REGISTRY_V2.register_manifest(manifest, overwrite=True)


def main(argv: list[str] | None = None) -> None:
    register()
    from lmms_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
