"""The built-in demo: a tiny Qwen2 with a character tokenizer, 2-digit addition, TRL GRPO on CPU.

Modules: ``model`` (tokenizer + model + ``save_base``), ``warmup`` (supervised warm-up),
``train`` (GRPO runs), ``layout`` (a run directory's files), ``plot`` (entropy/reward figure),
``report`` (per-checkpoint table), ``run`` (the `make demo` pipeline). The task itself is
the built-in one (rollouts/arithmetic.py).
"""
