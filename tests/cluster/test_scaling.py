"""The elastic pool's policy: as many workers as there is work for, within bounds."""

import pytest

from griffin_batch.cluster import scaling


@pytest.mark.parametrize(
    ("policy", "capacity", "busy", "queued", "want"),
    [
        # Default bound: one per host present; it grows as nodes join.
        (scaling.ScalingPolicy(), 4, 0, 100, 4),
        (scaling.ScalingPolicy(), 6, 4, 100, 6),
        (scaling.ScalingPolicy(), 0, 0, 100, 1),  # nothing up yet: ask for the minimum
        # An explicit bound asks beyond the nodes present: the autoscaler's demand.
        (scaling.ScalingPolicy(max_workers=16), 0, 0, 100, 16),
        (scaling.ScalingPolicy(max_workers=16), 2, 2, 3, 5),  # never more than the work
        # Nothing queued: keep the busy ones only, so idle nodes can scale down.
        (scaling.ScalingPolicy(max_workers=16), 8, 3, 0, 3),
        (scaling.ScalingPolicy(min_workers=4), 8, 1, 0, 1),
    ],
)
def test_target_follows_the_work_within_bounds(policy, capacity, busy, queued, want):
    assert policy.target(capacity=capacity, busy=busy, queued=queued) == want


def test_bounds_are_checked():
    with pytest.raises(ValueError, match="min_workers must be >= 1"):
        scaling.ScalingPolicy(min_workers=0)
    with pytest.raises(ValueError, match=r"max_workers \(2\) < min_workers \(3\)"):
        scaling.ScalingPolicy(min_workers=3, max_workers=2)
