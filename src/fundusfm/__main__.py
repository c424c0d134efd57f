from fundusfm.cli import run

run()
