"""``python -m pathdino.cli ...``: the same as the ``pathdino`` console script."""

from pathdino.cli.main import main

if __name__ == "__main__":
    main()
