"""Rush hour at the gates: quiet, a ramp to the peak, the peak, easing off (a Locust LoadTestShape).

    locust -f loadtests/locustfile.py,loadtests/scenarios/rush_hour.py --fixture F --headless -u 60 -r 10 -t 5m

--users is the peak, --run-time the whole day in small (default 5 minutes), --spawn-rate the fastest
the gates may open or close. The holders' phones and the hospital desks (fixed counts, spawned
first) stay on all the time; only the number of gates follows the curve. This file defines no
users: give it after the locustfile.
"""

from __future__ import annotations

import itertools

from locust import LoadTestShape

DEFAULT_SECONDS = 300.0
# (end of the stage as a fraction of the run, share of the peak gates at that point); linear in between.
CURVE = ((0.0, 0.15), (0.15, 0.15), (0.40, 1.0), (0.70, 1.0), (0.85, 0.35), (1.0, 0.35))


def gate_share(fraction: float) -> float:
    """The share of the peak gates open at this fraction of the run."""
    for (start, low), (end, high) in itertools.pairwise(CURVE):
        if fraction <= end:
            return low + (high - low) * (fraction - start) / (end - start) if end > start else high
    return CURVE[-1][1]


class RushHour(LoadTestShape):
    """Fixed users all the time; the gates follow CURVE up to --users in total."""

    use_common_options = True

    def tick(self) -> tuple[int, float] | None:
        """(users, spawn rate) now; None at the end of the run."""
        assert self.runner is not None
        options = self.runner.environment.parsed_options
        seconds = float(options.run_time or DEFAULT_SECONDS)
        elapsed = self.get_run_time()
        if elapsed >= seconds:
            return None
        peak = int(options.num_users or 1)
        fixed = sum(user_class.fixed_count for user_class in self.runner.user_classes)
        gates = round(max(0, peak - fixed) * gate_share(elapsed / seconds))
        return fixed + gates, float(options.spawn_rate or 10)
