from batchrun.cli import entry

raise SystemExit(entry())
