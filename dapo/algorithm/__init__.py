"""The DAPO maths, one short pure module per concern (tensors and numbers in, no I/O):

- ``advantages``: the group-relative advantage (GRPO's, with or without the std);
- ``loss``: the policy loss with Clip-Higher, dual clip, token-level aggregation,
  overlong filtering, importance weights, entropy and KL terms (its docstring lists
  DAPO's departures from GRPO by number);
- ``off_policy``: the correction for the policy that generated a sample (importance
  weights, rejection masks, the veto, mismatch metrics) and the staleness mask;
- ``dynamic_sampling``: which scored groups may enter a batch (0 < #correct < G);
- ``overlong``: the soft overlong punishment of the reward.
"""
