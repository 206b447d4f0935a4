"""Estimators of a step's effect on a quantity Q, from per-sequence values on an evaluation
batch E (MATH.md §2-4).

params (θ, θ+s·v, an Update's directions, dot products), quantities (Q as per-sequence
parts), snis (the true change by importance sampling), linear (first order by jvp),
gradients (∇Q by backward, per-sequence gradients, token jvps), influence (per-sequence and
per-token influences), two_phase (linear + SNIS remainder on a subsample), measure (the
entry point), exact (ground truth by enumeration), config (MeasureConfig, InfluenceConfig).
"""
