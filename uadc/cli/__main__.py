from uadc.cli import run

run()
