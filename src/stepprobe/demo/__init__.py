"""The built-in demo: a tiny Qwen2 with a character tokenizer, 2-digit addition, TRL GRPO on CPU.

Modules: ``model`` (tokenizer + model + ``save_base``), ``task`` (prompts + reward),
``warmup`` (supervised warm-up), ``train`` (GRPO runs), ``plot`` (entropy/reward figure),
``report`` (per-checkpoint table).
"""
