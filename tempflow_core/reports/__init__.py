"""What a run's results say: evaluation curves from the store, the paper's claims as verdicts,
Table 1's form and the reproduction bundle (report.py); every pair of variants and the
headline pair per iteration (pairs.py); the paper's figures (figures.py); sweep points as
curves (sweep.py); an experiment folder's committed records (records.py) and the figures and
tables drawn from them (redraw.py, behind `tempflow report DIR`).

Imports: anything in tempflow_core below it (run, algorithm, ...).
"""
