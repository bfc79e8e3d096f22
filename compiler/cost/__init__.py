"""The compiler's cost room: how fast a schedule runs on a GPU, before any GPU time is spent: the hardware table and
the published throughput it is fitted to, the cost model (``model``), launch order and SM placement, the schedule
search, and the simulator's predictions for a pattern, a decode step and a recurrence."""
