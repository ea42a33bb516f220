"""The tiny random-weight builders under the name tests use; they live in `mllm_efficiency.tiny` (the demo and
the offline trace generator build the same models)."""
from ..tiny import *  # noqa: F401,F403
from ..tiny import _text_config  # noqa: F401  (tests build text configs with it)
