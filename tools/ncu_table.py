"""The SASS table of `ncu -i REP --page source --csv --print-source sass` (tools/ncu_hot.py,
tools/ncu_lines.py; plain or .gz): its rows as dicts, column lookup by name fragments, numbers
with commas."""
import csv
import gzip


class SassTable:
    def __init__(self, path: str):
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rt", newline="") as f:
            lines = f.read().splitlines()
        start = next((i for i, l in enumerate(lines) if l.startswith('"Address"') or
                      l.startswith('"#"')), None)
        self.head = lines[:20]
        self.rows = list(csv.DictReader(lines[start:])) if start is not None else []
        self.cols = list(self.rows[0].keys()) if self.rows else []

    def col(self, *keys):
        """The first column whose name contains every key (case-insensitive), or None."""
        return next((c for c in self.cols if all(k.lower() in c.lower() for k in keys)), None)

    @staticmethod
    def num(v) -> float:
        try:
            return float(str(v).replace(",", ""))
        except ValueError:
            return 0.0
