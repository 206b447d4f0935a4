"""Reading a training checkpoint: weights or LoRA adapters, AdamW state by parameter name, the
run's settings and its reference model.

load (load_checkpoint: dispatch over the formats), hf_trainer (the TRL / HF Trainer format),
checkpoint (Checkpoint), settings (RunSettings from training_args.bin or a file), reference
(log π_ref as TRL computes it), precision (casting a loaded checkpoint).
"""
