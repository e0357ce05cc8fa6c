"""What a run's results say: evaluation curves from the store, the paper's claims as verdicts,
Table 1's form and the reproduction bundle (report.py); the paper's figures (figures.py).

Imports: anything in tempflow_core below it (run, algorithm, ...).
"""
