"""``uadc sweep``: recipe x target x calibration grids run as Ray tasks (spec, plan, cells,
ray_exec, store, table; ``run.run_sweep`` ties them together)."""
