"""``python -m uadc``: the ``uadc`` command."""

from uadc.cli import run

if __name__ == "__main__":
    run()
