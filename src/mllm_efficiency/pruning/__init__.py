"""Token pruning inside the LLM: the sequence gets shorter (or keys get hidden) between layers."""
