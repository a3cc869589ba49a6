"""Studies: each is a plan of runs, the runs, a report of their results, and a page
(:class:`~eva_rl.experiments.studies.base.Study`). A new study is a new module of that shape; no study module imports
another."""
