"""Many runs: two-stage recipes (``stages``: the teacher trained first), grids of recipes x seeds (``grid``) run as
submitit jobs (``launch``), each run's state (``run_state``) and the results table (``table``)."""
