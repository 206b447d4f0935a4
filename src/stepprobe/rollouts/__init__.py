"""Rollouts: the update batch U and the evaluation batch E, sampled as the run sampled.

tasks (Task, get_task: prompts + a verifiable reward), rewards (calling a reward as TRL
does), arithmetic (the built-in task), sampler (the KV-cached sampler), advantages (TRL's
group advantages), draw (sample, sample_batch: groups, resampling, the Batch), config
(SampleConfig).
"""
