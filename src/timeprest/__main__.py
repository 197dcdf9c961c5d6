from timeprest.cli import run

run()
