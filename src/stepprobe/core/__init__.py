"""The bottom layer: what every stage passes on and the tools they share, no model logic.

errors (the one exception type), names (the registry of name lists), io (atomic writes),
logs (logging and the event log), userfn (user functions by name), batch (Batch: the data
every box passes on), scoring (teacher-forced log-probabilities and entropies, as TRL
scores), attention (kernels and gradient rules the transforms need), precision (dtypes),
memory (chunk sizes).
"""
