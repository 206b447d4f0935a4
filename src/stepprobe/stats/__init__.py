"""Statistics on numbers, no model: intervals, the delta method (influence functions and
cluster variances), paired differences, regressions, variance allocation, linearity fits,
and the result protocol every estimate follows.
"""
