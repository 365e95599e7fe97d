"""``run.py --report``: compare runs over seeds, with the statistics to tell a gain from noise.
runs.py reads and groups the run folders, statistics.py compares them, output.py writes the
tables and plots."""
from eagan.report.output import write_report

__all__ = ["write_report"]
