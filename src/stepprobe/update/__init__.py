"""The update: the exact AdamW step a checkpoint's optimizer would take on a batch, and its
split into a baseline plus per-sequence and per-token parts (MATH.md §1).

objective (the one loss path: settings, framework loss, a variant's hook and terms),
trl_loss (TRL GRPOTrainer's per-token loss), adamw (the optimizer's arithmetic, split), replay
(replay_update, Update), save (save_update), capture (the exact batches of a TRL run).
"""
