"""`python -m mllm_efficiency.eval.lmms_main ARGS`: lmms-eval's own command line (`lmms_eval.__main__.cli_evaluate`)
with the `mllm_efficiency` model registered first. Use it where the package's entry point is not installed
(e.g. running from a source checkout); with the entry point, plain `lmms-eval --model mllm_efficiency` works too.
Multi-GPU: `accelerate launch --num_processes N -m mllm_efficiency.eval.lmms_main ARGS`.
"""
from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> None:
    from .plugin import register

    register()
    from lmms_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
